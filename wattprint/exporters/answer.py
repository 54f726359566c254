"""Energy in the answer: a request's figure as response headers, as ``usage.energy`` in a JSON body, and in
a server-sent-event stream (pure functions, used by :mod:`wattprint.exporters.http`).

The figure is the sidecar's record of the request (as ``GET /v1/requests/{id}`` gives it; looked up over the
sidecar's lookup socket, :mod:`wattprint.exporters.energy_zmq`, or its HTTP API): provisional at answer time
(the measured, settled part plus the fitted model's prediction for the steps the counter has not covered
yet), final at the URL and in the ledger later. Without one (sidecar down, slow or not reached) the
status is ``unavailable`` and no joules are named.

Streams: when the client asked for usage (``stream_options.include_usage``), the usage chunk gains
``usage.energy``; otherwise an SSE comment line ``: energy {...}`` is sent before ``data: [DONE]``
(comment lines are ignored by SSE clients, the OpenAI ones included).
"""

from __future__ import annotations

import json
import math

FIELDS = ("energy_j", "prefill_j", "decode_j", "kv_j")
HEADERS = {"energy_j": b"x-wattprint-energy-j", "prefill_j": b"x-wattprint-prefill-j",
           "decode_j": b"x-wattprint-decode-j", "kv_j": b"x-wattprint-kv-j"}
HEADER_STATUS = b"x-wattprint-energy-status"
HEADER_SOURCE = b"x-wattprint-source"
HEADER_CLASS = b"x-wattprint-class"
STATUSES = ("provisional", "final", "unavailable")
_MAX_LABEL = 64
DONE = b"data: [DONE]"


def energy_of(record: dict | None, url: str | None) -> dict:
    """``usage.energy``: the record's joules, status, source and class, and the URL of the final record."""
    out: dict = dict.fromkeys(FIELDS)
    out.update(status="unavailable", source=None, efficiency_class=None, url=url)
    if not isinstance(record, dict):
        return out
    values = {k: record.get(k) for k in FIELDS}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
               for v in values.values()):
        return out
    status = record.get("status")
    out.update(values, status=status if status in ("provisional", "final") else "provisional")
    for name in ("source", "efficiency_class"):
        v = record.get(name)
        if isinstance(v, str) and v and len(v) <= _MAX_LABEL and v.isascii() and v.isprintable():
            out[name] = v
    return out


def _number(v: float) -> bytes:
    return repr(float(v)).encode()


def energy_headers(energy: dict) -> list[tuple[bytes, bytes]]:
    """The ``X-Wattprint-*`` headers of a figure (the joules only when available)."""
    out = [(HEADER_STATUS, energy["status"].encode())]
    if energy["status"] != "unavailable":
        out += [(HEADERS[k], _number(energy[k])) for k in FIELDS]
    if energy.get("source"):
        out.append((HEADER_SOURCE, energy["source"].encode()))
    if energy.get("efficiency_class"):
        out.append((HEADER_CLASS, energy["efficiency_class"].encode()))
    return out


def _encode(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def with_usage_energy(body: bytes, energy: dict) -> bytes | None:
    """A JSON completion body with ``usage.energy`` added (None when it is not one: left as it is)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("usage"), dict):
        return None
    data["usage"]["energy"] = energy
    return _encode(data)


def completion_tokens(body: bytes) -> int | None:
    """``usage.completion_tokens`` of a JSON body or an SSE usage event's data (None when absent)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    usage = data.get("usage") if isinstance(data, dict) else None
    n = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


class SSEEvents:
    """Splits a response stream into whole events (``...\\n\\n``), whatever the message boundaries.
    A partial event longer than ``max_event_bytes`` is given up on: the stream then passes through."""

    def __init__(self, max_event_bytes: int = 1 << 20):
        self.buffer = b""
        self.max_event_bytes = max_event_bytes
        self.gave_up = False

    def feed(self, data: bytes) -> list[bytes]:
        """Whole events (each with its blank-line terminator); the rest stays buffered."""
        if self.gave_up:
            return [data] if data else []
        self.buffer += data.replace(b"\r\n", b"\n")
        events = []
        while True:
            i = self.buffer.find(b"\n\n")
            if i < 0:
                break
            events.append(self.buffer[: i + 2])
            self.buffer = self.buffer[i + 2:]
        if len(self.buffer) > self.max_event_bytes:
            self.gave_up = True
            events.append(self.buffer)
            self.buffer = b""
        return events

    def rest(self) -> bytes:
        out, self.buffer = self.buffer, b""
        return out


def event_data(event: bytes) -> bytes | None:
    """The data of an event that has one ``data:`` line (vLLM's events), else None."""
    lines = [ln for ln in event.split(b"\n") if ln]
    if len(lines) != 1 or not lines[0].startswith(b"data:"):
        return None
    return lines[0][5:].strip()


def is_done(event: bytes) -> bool:
    return event_data(event) == b"[DONE]"


def usage_event(event: bytes) -> bool:
    """True for a chunk carrying the usage (``"usage": {...}``, not null)."""
    data = event_data(event)
    if not data or not data.startswith(b"{") or b'"usage"' not in data:
        return False
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("usage"), dict)


def event_with_energy(event: bytes, energy: dict) -> bytes:
    """The usage event with ``usage.energy`` added (the event unchanged when it is not one)."""
    new = with_usage_energy(event_data(event) or b"", energy)
    return b"data: " + new + b"\n\n" if new is not None else event


def energy_comment(energy: dict) -> bytes:
    """The SSE comment that carries the figure when the stream has no usage chunk."""
    return b": energy " + _encode(energy) + b"\n\n"
