"""The wire between the engine hook and the sidecar: ZeroMQ PUSH -> PULL over ``ipc://``.

Messages are msgpack-encoded tagged structs (msgspec). Every time is ``time.monotonic()`` seconds,
which on Linux is one clock for every process of the machine, the clock the meters use too.

* :class:`Hello` - sent once by each hook when it starts (and again after a reconnect): the model
  geometry source and the engine's identity.
* :class:`Steps` - one or more :class:`StepRecord` (usually one: the step that just ended), with the
  hook's running count of records it had to drop because the queue was full.

The hook never blocks: it sends with ``zmq.NOBLOCK`` into a bounded queue (``SNDHWM``) and counts what
it drops; ZeroMQ reconnects by itself when a sidecar binds the address again
(:mod:`wattprint.profiler.transport.sender`).
"""

from __future__ import annotations

import os

import msgspec

from wattprint.profiler.core.records import StepRecord

DEFAULT_SOCKET = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/tmp", "wattprint.sock")
ENV_SIDECAR = "WATTPRINT_SIDECAR"  # the address the hook sends to: a path or an ipc:// URL
SEND_HWM = 10_000  # records queued in the hook before it drops (and counts) new ones


class Hello(msgspec.Struct, tag="hello"):
    pid: int
    model: str  # served model name
    model_config: dict  # the Hugging Face config.json of the served model (geometry for the cost model)
    engine: str = "vllm"
    engine_version: str = ""
    kv_block_size: int | None = None
    tensor_parallel_size: int = 1


class Steps(msgspec.Struct, tag="steps"):
    pid: int
    records: list[StepRecord]
    dropped_total: int = 0  # records this hook has dropped so far (queue full)


Message = Hello | Steps

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Hello | Steps) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Hello | Steps:
    """Decode one message; raises ``msgspec.DecodeError``/``ValidationError`` on garbage."""
    return _decoder.decode(data)


def address(value: str | None = None) -> str:
    """Normalise a socket path or URL to a ZeroMQ address (``ipc://PATH`` for a bare path)."""
    value = value or os.environ.get(ENV_SIDECAR) or DEFAULT_SOCKET
    return value if "://" in value else f"ipc://{os.path.abspath(value)}"
