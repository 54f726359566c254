"""The request ledger: one JSON line per finished request, appended and never rewritten.

Each line holds the fields of :class:`~wattprint.profiler.core.results.RequestResult` (``model`` and
``source`` always filled in), plus ``j_per_output_token``. Lines are written with a single
``write()`` on a descriptor opened with ``O_APPEND``: there is no user-space buffer, so a crash loses
at most the line being written. ``fsync`` runs at most every ``fsync_interval_s`` seconds (and on
:meth:`Ledger.close`), so a power cut may lose the lines of that interval, never corrupt earlier ones.

On open, the existing file is scanned:

* a torn last line (bytes after the last newline: a write cut short) is truncated away;
* a line in the middle that does not decode is counted in ``corrupt_lines`` and skipped;
* the ids already recorded as final are loaded (the most recent ``max_ids`` of them), so that a
  restarted sidecar does not write a final request twice.

A line with ``"status": "provisional"`` is a request cut short by a sidecar shutdown (or an engine
change): it holds the energy of the part that was attributed. It does not block a later line for the
same id: when the engine kept running the request, the restarted sidecar writes its remaining part
as a second line, so the request's energy is the sum of its lines.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

import msgspec

from wattprint.errors import InputError
from wattprint.profiler.core.results import RequestResult

log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()
_SCAN_CHUNK = 1 << 20


class _IdOnly(msgspec.Struct):
    id: str
    status: str = "final"


_id_decoder = msgspec.json.Decoder(_IdOnly)


def result_line(result: RequestResult, *, model: str | None = None, source: str | None = None) -> bytes:
    """The ledger line of one result (JSON object + newline)."""
    data = msgspec.structs.asdict(result)
    if model is not None and not data.get("model"):
        data["model"] = model
    if source is not None and not data.get("source"):
        data["source"] = source
    data["j_per_output_token"] = result.j_per_output_token
    return _encoder.encode(data) + b"\n"


class Ledger:
    """Append-only JSON-lines file of finished requests; knows which ids it already holds."""

    def __init__(self, path: str | os.PathLike, *, fsync_interval_s: float = 1.0, max_ids: int = 1_000_000):
        self.path = Path(path)
        self.fsync_interval_s = fsync_interval_s
        self.max_ids = max(1, int(max_ids))
        self._ids: set[str] = set()
        self._order: deque[str] = deque()
        self._lock = threading.Lock()
        #: bytes of a torn last line removed on open
        self.truncated_bytes = 0
        #: complete lines that did not decode (kept in the file, ignored)
        self.corrupt_lines = 0
        #: lines found on open
        self.loaded_lines = 0
        #: lines appended by this instance
        self.written = 0
        #: appends refused because the id was already recorded
        self.duplicates = 0
        self._dirty = False
        self._last_fsync = time.monotonic()
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"cannot open ledger: {exc.strerror or exc}", str(self.path)) from exc
        try:
            self._scan()
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            raise InputError(f"cannot read ledger: {exc.strerror or exc}", str(self.path)) from exc

    # ------------------------------------------------------------------------------------------ open
    def _remember(self, rid: str) -> None:
        if rid in self._ids:
            return
        self._ids.add(rid)
        self._order.append(rid)
        while len(self._order) > self.max_ids:
            self._ids.discard(self._order.popleft())

    def _scan(self) -> None:
        fd = self._fd
        size = os.fstat(fd).st_size
        pos = 0
        carry = b""
        last_newline_end = 0  # offset just past the last newline seen
        lineno = 0
        while pos < size:
            chunk = os.pread(fd, min(_SCAN_CHUNK, size - pos), pos)
            if not chunk:
                break
            data = carry + chunk
            base = pos - len(carry)
            pos += len(chunk)
            start = 0
            while True:
                nl = data.find(b"\n", start)
                if nl < 0:
                    break
                line = data[start:nl]
                lineno += 1
                last_newline_end = base + nl + 1
                if line.strip():
                    try:
                        rec = _id_decoder.decode(line)
                        if rec.status == "final":
                            self._remember(rec.id)
                        self.loaded_lines += 1
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        self.corrupt_lines += 1
                        log.warning("%s:%d: ledger line is not a request record; ignored", self.path, lineno)
                start = nl + 1
            carry = data[start:]
        if last_newline_end < size:
            self.truncated_bytes = size - last_newline_end
            log.warning(
                "%s: removing a torn last line (%d bytes without a trailing newline)", self.path, self.truncated_bytes
            )
            os.ftruncate(fd, last_newline_end)
            os.fsync(fd)

    # ----------------------------------------------------------------------------------------- write
    def __contains__(self, rid: object) -> bool:
        return rid in self._ids

    def __len__(self) -> int:
        """Ids known (bounded by ``max_ids``)."""
        return len(self._ids)

    def append(self, result: RequestResult, *, model: str | None = None, source: str | None = None) -> bool:
        """Append one request; False (and nothing written) for a final result whose id is already
        recorded as final."""
        line = result_line(result, model=model, source=source)
        with self._lock:
            if self._fd is None:
                raise InputError("ledger is closed", str(self.path))
            final = result.status == "final"
            if final and result.id in self._ids:
                self.duplicates += 1
                return False
            view = memoryview(line)
            while view:  # one write() for a regular file; the loop only guards against short writes
                n = os.write(self._fd, view)
                view = view[n:]
            if final:
                self._remember(result.id)
            self.written += 1
            self._dirty = True
            if self.fsync_interval_s is not None and time.monotonic() - self._last_fsync >= self.fsync_interval_s:
                self._fsync_locked()
        return True

    def _fsync_locked(self) -> None:
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_fsync = time.monotonic()

    def flush(self) -> None:
        """Force what was written to disk (``fsync``)."""
        with self._lock:
            self._fsync_locked()

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                self._fsync_locked()
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def read_ledger(path: str | os.PathLike) -> list[dict]:
    """Every complete, decodable line of a ledger as a dict (a torn or corrupt line is skipped)."""
    out = []
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    if not data.endswith(b"\n"):
        lines = lines[:-1]  # a torn last line
    for raw in lines:
        if raw.strip():
            try:
                out.append(msgspec.json.decode(raw))
            except msgspec.DecodeError:
                continue
    return out
