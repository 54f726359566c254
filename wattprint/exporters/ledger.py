"""The request ledger: one JSON line per finished request, appended and never rewritten.

Each line holds the fields of :class:`~wattprint.profiler.core.results.RequestResult` (``model`` and
``source`` always filled in), plus ``j_per_output_token``. Lines are written with a single
``write()`` on a descriptor opened with ``O_APPEND``: there is no user-space buffer, so a crash loses
at most the line being written. ``fsync`` runs at most every ``fsync_interval_s`` seconds (and on
:meth:`Ledger.close`), so a power cut may lose the lines of that interval, never corrupt earlier ones.

The file is private: created with mode 0600 (``mode``: e.g. 0640 to let a group read it), opened with
``O_NOFOLLOW`` (a symlink is refused, as is anything but a regular file) and tightened to ``mode`` when
it is wider. Opening checks that the file can be written and that its file system has room.

A write that fails (disk full, I/O error) is undone: the file is truncated back to its last whole line,
the line is kept (at most ``max_pending`` lines) and written before the next one, ``healthy`` is False
until a write succeeds again, and :meth:`Ledger.append` raises the ``OSError`` (the sidecar counts it).
Lines that do not fit in the pending queue are counted in ``lost_lines``.

On open, the existing file is scanned:

* a torn last line (bytes after the last newline: a write cut short) is truncated away;
* a line in the middle that does not decode is counted in ``corrupt_lines`` and skipped;
* the (engine, id) pairs already recorded as final are loaded (the most recent ``max_ids`` of them), so
  that a restarted sidecar does not write a final request twice.

A line with ``"status": "provisional"`` is a request cut short by a sidecar shutdown (or an engine
change): it holds the energy of the part that was attributed. It does not block a later line for the
same id: when the engine kept running the request, the restarted sidecar writes its remaining part
as a second line, so the request's energy is the sum of its lines.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import deque
from pathlib import Path

import msgspec

from wattprint.errors import InputError
from wattprint.files import private_dir
from wattprint.profiler.core.results import RequestResult

log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()
_SCAN_CHUNK = 1 << 20


class _IdOnly(msgspec.Struct):
    id: str
    status: str = "final"
    engine: str = ""


def _key(engine: str, rid: str) -> str:
    return f"{engine}\x00{rid}"


_MIN_FREE_BYTES = 64 << 10


_id_decoder = msgspec.json.Decoder(_IdOnly)


def result_line(result: RequestResult, *, model: str | None = None, source: str | None = None) -> bytes:
    """The ledger line of one result (JSON object + newline)."""
    data = msgspec.structs.asdict(result)
    if model is not None and not data.get("model"):
        data["model"] = model
    if source is not None and not data.get("source"):
        data["source"] = source
    data["j_per_output_token"] = result.j_per_output_token
    data["logged_unix_s"] = time.time()  # wall-clock date of the line (step times are monotonic)
    return _encoder.encode(data) + b"\n"


class Ledger:
    """Append-only JSON-lines file of finished requests; knows which ids it already holds."""

    def __init__(self, path: str | os.PathLike, *, fsync_interval_s: float = 1.0, max_ids: int = 1_000_000,
                 mode: int = 0o600, max_pending: int = 10_000):
        self.path = Path(path)
        self.mode = mode
        self.max_pending = max_pending
        self._pending: deque[tuple[bytes, str | None]] = deque()
        #: False after a failed write, until one succeeds
        self.healthy = True
        #: writes that failed (each undone), and lines lost because the pending queue was full
        self.failed_writes = 0
        self.lost_lines = 0
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
                private_dir(self.path.parent)
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                                           | os.O_CLOEXEC | os.O_NONBLOCK, mode)
        except OSError as exc:
            why = "a symlink" if exc.errno == errno.ELOOP else (exc.strerror or exc)
            raise InputError(f"cannot open ledger for writing: {why}", str(self.path)) from exc
        try:
            self._check_file()
            self._scan()
        except (OSError, InputError) as exc:
            os.close(self._fd)
            self._fd = None
            if isinstance(exc, InputError):
                raise
            raise InputError(f"cannot read ledger: {exc.strerror or exc}", str(self.path)) from exc

    # ------------------------------------------------------------------------------------------ open
    def _check_file(self) -> None:
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError("ledger is not a regular file", str(self.path))
        if stat.S_IMODE(st.st_mode) & ~self.mode:
            try:
                os.fchmod(self._fd, stat.S_IMODE(st.st_mode) & self.mode)
            except OSError as exc:
                raise InputError(f"ledger has mode {stat.S_IMODE(st.st_mode):o}, wider than {self.mode:o}, and "
                                 f"cannot be tightened: {exc.strerror or exc}", str(self.path)) from exc
        vfs = os.fstatvfs(self._fd)
        if vfs.f_bavail * vfs.f_frsize < _MIN_FREE_BYTES:
            raise InputError("no space left for the ledger on its file system", str(self.path))

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
                            self._remember(_key(rec.engine, rec.id))
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
        """Whether ``rid`` (engine ``""``) or ``(engine, rid)`` is recorded as final."""
        if isinstance(rid, tuple):
            return _key(*rid) in self._ids
        return _key("", str(rid)) in self._ids

    def __len__(self) -> int:
        """Ids known (bounded by ``max_ids``)."""
        return len(self._ids)

    def append(self, result: RequestResult, *, model: str | None = None, source: str | None = None) -> bool:
        """Append one request; False (and nothing written) when its (engine, id) is already recorded
        as final. Raises OSError when the write failed (the line is kept for later)."""
        line = result_line(result, model=model, source=source)
        key = _key(getattr(result, "engine", "") or "", result.id)
        with self._lock:
            if self._fd is None:
                raise InputError("ledger is closed", str(self.path))
            if key in self._ids:  # a final line exists: nothing more can belong to that request
                self.duplicates += 1
                return False
            if result.status == "final":
                self._remember(key)
            self._pending.append((line, key if result.status == "final" else None))
            while len(self._pending) > self.max_pending:
                self._pending.popleft()
                self.lost_lines += 1
            self._drain_locked()
            if self.fsync_interval_s is not None and time.monotonic() - self._last_fsync >= self.fsync_interval_s:
                self._fsync_locked()
        return True

    def _drain_locked(self) -> None:
        """Write the pending lines in order; a failed write is undone and raised."""
        while self._pending:
            line, _ = self._pending[0]
            end = os.fstat(self._fd).st_size
            try:
                view = memoryview(line)
                while view:  # one write() for a regular file; the loop only guards against short writes
                    n = os.write(self._fd, view)
                    view = view[n:]
            except OSError:
                self.failed_writes += 1
                self.healthy = False
                try:
                    os.ftruncate(self._fd, end)  # back to the last whole line
                except OSError:
                    log.exception("%s: could not truncate a failed write", self.path)
                raise
            self._pending.popleft()
            self.written += 1
            self._dirty = True
            self.healthy = True

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
                if self._pending:
                    try:
                        self._drain_locked()
                    except OSError:
                        self.lost_lines += len(self._pending)
                        log.error("%s: %d ledger lines could not be written", self.path, len(self._pending))
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
