"""Engine sessions: what the sidecar knows about the engine process whose steps it attributes.

A session starts with that engine's ``Hello``: its model geometry (from the Hello's ``model_config``) and
its key (served model, config, pid). A Hello with the same key is the same engine again (its hook
reconnected); another key is a new engine whose step numbers start again.

The last Hello is kept next to the socket (``PATH.hello``, mode 0600) by :class:`HelloFile`, so that a
restarted sidecar can attribute steps arriving from the same engine process before its hook says
Hello again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import msgspec

from wattprint.errors import ConfigError, InputError
from wattprint.files import atomic_write
from wattprint.profiler.core.costmodel import ModelGeometry, geometry_from_config
from wattprint.profiler.transport import messages as transport

log = logging.getLogger(__name__)


def session_key(hello: transport.Hello) -> tuple[str, bytes, int]:
    """(served model, canonical config, pid): equal keys are the same engine process."""
    try:
        config_key = msgspec.json.encode(hello.model_config, order="sorted")
    except Exception:  # noqa: BLE001 - an odd config still gets a key
        config_key = repr(hello.model_config).encode()
    return hello.model, config_key, hello.pid


@dataclass(frozen=True)
class EngineSession:
    """One engine process: its key, served model name and geometry (None when it cannot be modelled,
    then ``error`` says why)."""

    key: tuple[str, bytes, int]
    model: str
    pid: int
    geometry: ModelGeometry | None
    error: str | None = None

    @property
    def supported(self) -> bool:
        return self.geometry is not None

    @classmethod
    def from_hello(cls, hello: transport.Hello) -> EngineSession:
        key = session_key(hello)
        try:
            geometry = geometry_from_config(hello.model_config, name=hello.model)
        except (ConfigError, InputError) as exc:
            return cls(key, hello.model, hello.pid, None, str(exc))
        return cls(key, hello.model, hello.pid, geometry)


class HelloFile:
    """The engine's last Hello, kept in a private file for a restarted sidecar."""

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def beside(cls, socket_file: str | None) -> HelloFile | None:
        """``SOCKET.hello`` next to an ipc:// socket file; None for other addresses."""
        return cls(f"{socket_file}.hello") if socket_file else None

    def save(self, hello: transport.Hello) -> None:
        """Write the Hello (mode 0600, replaced whole). Raises OSError."""
        atomic_write(self.path, transport.encode(hello), mode=0o600)

    def load(self) -> transport.Hello | None:
        """The saved Hello; None when there is none or it is unreadable (logged)."""
        try:
            with open(self.path, "rb") as f:
                msg = transport.decode(f.read())
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("wattprint sidecar: ignoring unreadable %s: %s", self.path, exc)
            return None
        return msg if isinstance(msg, transport.Hello) else None
