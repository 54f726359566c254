"""The wire between the engine hook and the sidecar: ZeroMQ PUSH -> PULL over ``ipc://``
(the protocol, its fields and its limits: ``docs/wire.md``).

Messages are msgpack-encoded tagged structs (msgspec). Every time is ``time.monotonic()`` seconds,
which on Linux is one clock for every process of the machine, the clock the meters use too.

* :class:`Hello` - sent once by each hook when it starts (and again after a reconnect): the model
  geometry source and the engine's identity.
* :class:`Steps` - one or more step records (usually one: the step that just ended), with the hook's
  running count of records it had to drop because the queue was full.

``session`` (both messages) is a random token the hook draws when it starts: with the pid it names the
engine process, so that several engines (data parallel, several models, several containers) feed one
sidecar without disturbing each other. Entries may carry ``ref`` (:class:`WireEntry`), the reference the
HTTP middleware gave the request (``vllm_xargs.wattprint_ref``): the key of its energy URL.

The hook never blocks: it sends with ``zmq.NOBLOCK`` into a bounded queue (``SNDHWM``) and counts what
it drops; ZeroMQ reconnects by itself when a sidecar binds the address again
(:mod:`wattprint.profiler.transport.sender`).
"""

from __future__ import annotations

import os

import msgspec

from wattprint.profiler.core.records import RequestEntry, StepRecord

ENV_SIDECAR = "WATTPRINT_SIDECAR"  # the address the hook sends to: a path or an ipc:// URL
SOCKET_NAME = "sidecar.sock"
SEND_HWM = 10_000  # records queued in the hook before it drops (and counts) new ones
MAX_MESSAGE_BYTES = 8 << 20  # a bigger message disconnects the peer (ZMQ_MAXMSGSIZE)
MAX_SESSION_CHARS = 64


class WireEntry(RequestEntry, omit_defaults=True, gc=False):
    """A request entry as it travels: :class:`RequestEntry` and the middleware's reference."""

    ref: str | None = None


class WireStep(StepRecord, omit_defaults=True):
    """A step record as it travels (its entries may carry ``ref``)."""

    requests: list[WireEntry]


class Hello(msgspec.Struct, tag="hello"):
    pid: int
    model: str  # served model name
    model_config: dict  # the Hugging Face config.json of the served model (geometry for the cost model)
    engine: str = "vllm"
    engine_version: str = ""
    kv_block_size: int | None = None
    tensor_parallel_size: int = 1
    session: str = ""  # the hook's random token ("" from older hooks: the pid names the engine)
    devices: list[int] | None = None  # the meter's device indices the engine runs on, when it knows them


class Steps(msgspec.Struct, tag="steps"):
    pid: int
    records: list[WireStep]
    dropped_total: int = 0  # records this hook has dropped so far (queue full)
    session: str = ""


Message = Hello | Steps

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Hello | Steps) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Hello | Steps:
    """Decode one message; raises ``msgspec.DecodeError``/``ValidationError`` on garbage."""
    return _decoder.decode(data)


def session_key(msg: Hello | Steps) -> str:
    """The engine process a message comes from: its hook's session token, else its pid."""
    return f"s:{msg.session[:MAX_SESSION_CHARS]}" if msg.session else f"pid:{msg.pid}"


def runtime_dir() -> str:
    """The private directory of the default socket (and the sidecar's state files):
    ``$XDG_RUNTIME_DIR/wattprint`` (a per-user 0700 directory), else ``/run/wattprint`` for root, else
    ``$XDG_STATE_HOME/wattprint/run`` (``~/.local/state/wattprint/run``): never a predictable path in a
    shared directory. Nothing is created here (the sidecar creates it: :mod:`wattprint.profiler.sidecar.paths`)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        try:
            st = os.stat(xdg)
            if st.st_uid == os.getuid() and not st.st_mode & 0o077:
                return os.path.join(xdg, "wattprint")
        except OSError:
            pass
    if os.getuid() == 0:
        return "/run/wattprint"
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "wattprint", "run")


def default_socket() -> str:
    return os.path.join(runtime_dir(), SOCKET_NAME)


def address(value: str | None = None) -> str:
    """Normalise a socket path or URL to a ZeroMQ address (``ipc://PATH`` for a bare path)."""
    value = value or os.environ.get(ENV_SIDECAR) or default_socket()
    return value if "://" in value else f"ipc://{os.path.abspath(value)}"
