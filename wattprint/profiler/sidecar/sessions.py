"""Engine sessions: what the sidecar knows about each engine process whose steps it attributes.

A session starts with that engine's ``Hello`` and is named by the hook's session token (older hooks: by
pid, :func:`~wattprint.profiler.transport.messages.session_key`). It holds the engine's model geometry,
the meter devices it owns, its own attributor, the last step it accepted (the order of its next records
is checked against it, and against nothing else), and the requests it has in flight, so that those
whose records were lost are reported ``incomplete`` with what is missing. Several sessions run side by
side (data parallel engines, several models); a Hello only ever concerns its own session.

Model labels are bounded (:class:`ModelLabels`): the configured names, else the first ``max_models``
seen, then ``other``.

The Hellos of the live sessions are kept in a private state file next to the socket (``PATH.hello``,
:class:`HelloFile`), so that a restarted sidecar can attribute steps arriving from those engines before
their hooks say Hello again; it is read back only when it is private and ours, and each Hello in it is
checked like one from the wire.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import msgspec

from wattprint.errors import ConfigError
from wattprint.profiler.core.costmodel import ModelGeometry, geometry_from_config
from wattprint.profiler.sidecar.paths import read_private, write_private
from wattprint.profiler.transport import messages as transport

log = logging.getLogger(__name__)

OTHER_MODEL = "other"
#: geometry of the device-only account of an engine the cost model cannot describe (no step is fed to
#: it: every joule of its devices is idle)
_PLACEHOLDER = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 1,
                "num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": 64}
#: what a missing record means for a request (the ``missing`` field of its result)
MISSING_START = "start"  # first seen without its prompt: its earlier steps never arrived
MISSING_STEPS = "steps"  # records of its session were lost while it was in flight


class ModelLabels:
    """Bounded model labels: configured names (others become ``other``), or the first ``max_models``."""

    def __init__(self, configured: tuple[str, ...] | None = None, max_models: int = 16):
        self.configured = tuple(configured) if configured else None
        self.max_models = max(1, max_models)
        self._seen: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        label = self._seen.get(name)
        if label is None:
            if self.configured is not None:
                label = name if name in self.configured else OTHER_MODEL
            else:
                label = name if len(self._seen) < self.max_models else OTHER_MODEL
            if len(self._seen) < 4 * self.max_models:
                self._seen[name] = label
        return label


@dataclass(eq=False)
class EngineSession:
    """One engine process. ``state``: ``attributing``, ``unsupported`` (the cost model cannot describe
    its model: its devices' energy is all idle, its steps are counted as dropped) or ``unmetered`` (no
    device left for it: its steps are counted as dropped ``no_device``)."""

    key: str
    hello: transport.Hello
    label: str
    geometry: ModelGeometry | None
    error: str | None = None
    devices: tuple[int, ...] = ()
    explicit: bool = False  # the Hello named its devices
    attributor: object | None = None
    prev: tuple[int, float] | None = None  # the last accepted (step, t_end)
    last_seen: float = field(default_factory=time.monotonic)
    live: dict = field(default_factory=dict)  # request id -> itself (one string per id), seen, not emitted
    missing: dict = field(default_factory=dict)  # request id -> what is missing
    steps: int = 0

    @property
    def state(self) -> str:
        if self.geometry is None:
            return "unsupported"
        return "attributing" if self.attributor is not None else "unmetered"

    @property
    def pid(self) -> int:
        return self.hello.pid

    @classmethod
    def from_hello(cls, hello: transport.Hello, label: str) -> EngineSession:
        try:
            geometry = geometry_from_config(hello.model_config, name=hello.model)
        except Exception as exc:  # noqa: BLE001 - anything the config holds
            return cls(transport.session_key(hello), hello, label, None, str(exc))
        return cls(transport.session_key(hello), hello, label, geometry)

    def accounting_geometry(self) -> ModelGeometry:
        """The geometry its attributor is built with (a placeholder for an unsupported model)."""
        return self.geometry if self.geometry is not None else geometry_from_config(_PLACEHOLDER, name="unattributed")

    def note_gap(self) -> None:
        """Records of this session were lost: every request in flight misses some."""
        for rid in self.live:
            self.missing.setdefault(rid, MISSING_STEPS)

    def note_new(self, entries) -> None:
        """Requests seen for the first time (a request first seen without its prompt misses its start)."""
        for e in entries:
            self.live[e.id] = e.id
            if e.prefill_tokens == 0:
                self.missing[e.id] = MISSING_START

    def forget(self, rid: str) -> str | None:
        """The request was emitted: forget it; returns what it missed (None: nothing)."""
        self.live.pop(rid, None)
        return self.missing.pop(rid, None)

    def alive(self) -> bool:
        """False when its process is known to have exited (same pid namespace)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True


class HelloFile:
    """The live sessions' Hellos, kept in a private file for a restarted sidecar."""

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def beside(cls, socket_file: str | None) -> HelloFile | None:
        """``SOCKET.hello`` next to an ipc:// socket file; None for other addresses."""
        return cls(f"{socket_file}.hello") if socket_file else None

    def save(self, hellos: list[transport.Hello]) -> None:
        """Write the Hellos (mode 0600, replaced whole). Raises OSError."""
        write_private(self.path, msgspec.msgpack.encode(hellos))

    def load(self) -> list[transport.Hello]:
        """The saved Hellos; [] when there are none or the file is not private, ours and well-formed (logged)."""
        try:
            data = read_private(self.path)
            if data is None:
                return []
            hellos = msgspec.msgpack.decode(data, type=list[transport.Hello])
        except (ConfigError, OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("wattprint sidecar: ignoring %s: %s", self.path, exc)
            return []
        return hellos[:256]
