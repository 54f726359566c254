"""``steps.jsonl`` decoded on the cores the process may use: forked workers decode chunks of whole lines
into their columns (no Python object per entry crosses the pipe), this process too while the next chunk
is not ready; it takes the chunks in file order, a bounded number ahead, and checks the order across them.
Lines giving their requests as columns (what wattprint writes) are read into columns without a Python
object per entry (:func:`step_columns`), on one core as on several.

The chunks are the ones :func:`records.iter_step_chunks` reads, so the compact trace built from them is
the same. A chunk that cannot be taken as columns (a bad record, a step out of order with the chunk
before) is decoded again by the sequential code, which names the file's line exactly as it does alone.
One core, a small file, or a process that is itself a worker: the sequential path, as it is.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from itertools import chain
from operator import attrgetter
from pathlib import Path

import msgspec
import numpy as np

from wattprint.errors import InputError
from wattprint.profiler.core import chunkmeta, records
from wattprint.profiler.core.records import (
    EntryArrays,
    StepRecord,
    StepTimes,
    check_entries,
    check_times,
)
from wattprint.profiler.core.stepcolumns import ColumnMeta, RawColumns, raw_columns

CHUNK_BYTES = records.CHUNK_BYTES
QUEUED = 2  # results a worker may have done that this process has not taken yet
_get_requests = attrgetter("requests")


_line_decoder = msgspec.json.Decoder(records.StepLine[RawColumns])  # ids, prefill, decode raw


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def iter_step_columns(path: str | Path, chunk_bytes: int = CHUNK_BYTES, cores: int | None = None,
                      ) -> Iterator[tuple[StepTimes | list, EntryArrays]]:
    """Steps and their entry columns a chunk at a time, in file order, for :class:`CompactTrace`.
    ``cores``: processes decoding, this one included (default: the usable cores); 1, or a file under two
    chunks, reads sequentially with :func:`records.iter_step_chunks`."""
    cores = usable_cores() if cores is None else cores
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0  # the sequential path reports it
    if cores < 2 or size <= 2 * chunk_bytes or _in_worker():
        yield from _sequential(path, chunk_bytes)
    else:
        yield from _parallel(str(path), size, chunk_bytes, cores)


def _sequential(path: str | Path, chunk_bytes: int) -> Iterator[tuple[StepTimes | list, EntryArrays]]:
    """:func:`records.iter_step_chunks` with lines as columns; chunks scanned for metadata only once one
    needed it (as the workers do)."""
    chunkmeta.flag = chunkmeta.Flag()
    try:
        yield from records.iter_step_chunks(path, chunk_bytes, _compact_columns)
    finally:
        chunkmeta.flag = None


def _parallel(path: str, size: int, chunk_bytes: int, cores: int) -> Iterator[tuple[StepTimes | list, EntryArrays]]:
    """``cores - 1`` forked workers and this process take chunks from one shared counter (no thread
    hands them over); a worker writes each result to a private unlinked file and sends where it lies.
    This process takes the chunks in order and decodes the next chunk itself while the one it needs is
    not ready. This process decodes at most ``2 * cores`` chunks ahead of the one it takes, a worker at
    most ``QUEUED`` (bounded memory, whichever core is the slower); a worker that dies leaves its chunks,
    and the rest, to this process."""
    import multiprocessing  # here: imports the sequential path does without
    import pickle
    import tempfile
    from multiprocessing.connection import wait

    try:
        stores = [[tempfile.TemporaryFile() for _ in range(QUEUED)] for _ in range(cores - 1)]  # 0600, no name
    except OSError:  # no temporary directory to write in: read here alone
        yield from _sequential(path, chunk_bytes)
        return
    ctx = multiprocessing.get_context("fork")
    chunkmeta.flag = scan = ctx.RawValue("b", 0)  # shared with the workers
    ahead = 2 * cores
    with open(path, "rb") as f:
        spans = list(_chunk_bounds(f.fileno(), size, chunk_bytes))
    n, taken, lock = len(spans), ctx.RawValue("q", 0), ctx.Lock()
    slots = [ctx.Semaphore(QUEUED) for _ in range(cores - 1)]  # a worker's results not yet taken
    reader, writer = ctx.Pipe(duplex=False)
    workers = [ctx.Process(target=_work, daemon=True, args=(path, spans, taken, lock, slots[k], writer, stores[k], k,
                                                            os.getpid(), scan)) for k in range(cores - 1)]
    try:
        for w in workers:
            w.start()
        writer.close()
        got: dict[int, tuple] = {}  # chunks the workers have done: (worker, file, size)
        here: dict[int, tuple | None] = {}  # chunks decoded here ahead of their turn
        live = {w.sentinel: w for w in workers}
        prev: StepTimes | None = None
        i, broken = 0, False
        with open(path, "rb") as f:
            while i < n:
                if i not in here and i not in got:
                    if broken:
                        here[i] = None  # read below by the sequential code
                    elif taken.value < min(n, i + ahead):  # the next chunk, decoded here meanwhile
                        j = _take(taken, lock)
                        broken = j is None
                        if not broken and j < n:
                            here[j] = _decode_chunk(path, *spans[j])
                    else:  # wait for a worker's chunk, or its end
                        broken = _receive(wait([reader, *live]), reader, live, got)
                    if broken:  # a worker was killed (out of memory?): the rest is read here
                        _stop(workers)
                    continue
                if i in here:
                    out = here.pop(i)
                else:
                    k, slot, nbytes = got.pop(i)
                    out = pickle.loads(os.pread(stores[k][slot].fileno(), nbytes, 0))
                    slots[k].release()
                if out is not None and prev is not None and len(out[0]):
                    try:
                        check_times(StepTimes(out[0].step[:1], out[0].t_start[:1], out[0].t_end[:1]), path, None, prev)
                    except InputError:
                        out = None
                if out is None:  # the sequential code names the problem, with the file's line
                    out = _sequential_chunk(f.fileno(), path, spans[i], prev)
                if len(out[0]):
                    prev = StepTimes.of(out[0][-1:]) if isinstance(out[0], list) else out[0].last()
                    yield out
                i += 1
    finally:
        _stop(workers)
        reader.close()
        for f in chain.from_iterable(stores):
            f.close()
        chunkmeta.flag = None
    if prev is None:
        raise InputError("no steps", path)


def _receive(ready: list, reader, live: dict, got: dict) -> bool:
    """Note what the workers sent (``got``: chunk -> worker, file, size) and which ended; True: one was
    killed, or every one is gone."""
    broken = False
    for r in ready:
        if r is reader:
            try:
                j, k, slot, nbytes = reader.recv()
                got[j] = (k, slot, nbytes)
            except EOFError:
                broken = True
        elif live.pop(r).exitcode != 0:
            broken = True
    return broken


def _stop(workers: list) -> None:
    for w in workers:
        if w.is_alive():
            w.kill()
        w.join()


def _take(taken, lock) -> int | None:
    """The next chunk's number from the counter the processes share (None: a worker died holding the
    lock, so the rest is read here)."""
    if not lock.acquire(timeout=10):
        return None
    try:
        j = taken.value
        taken.value = j + 1
        return j
    finally:
        lock.release()


def _work(path: str, spans: list[tuple[int, int]], taken, lock, slots, conn, files: list, k: int,
          parent: int, scan) -> None:
    """A worker: chunks from the shared counter until none is left, each result pickled into the next of
    its files (a file is reused once its result was taken: at most ``len(files)`` results wait)."""
    _worker_init(parent, scan)
    import pickle

    m = 0
    while True:
        slots.acquire()
        j = _take(taken, lock)
        if j is None or j >= len(spans):
            break
        data = pickle.dumps(_decode_chunk(path, *spans[j]), protocol=pickle.HIGHEST_PROTOCOL)
        os.pwrite(files[m % len(files)].fileno(), data, 0)
        conn.send((j, k, m % len(files), len(data)))
        m += 1
    conn.close()


def step_columns(data: bytes | memoryview, path: str,
                 prev: StepRecord | StepTimes | None) -> tuple[StepTimes | list[StepRecord], EntryArrays] | None:
    """A chunk of whole lines, validated (``prev``: the step before them): lines with their requests as
    columns become columns without a Python object per entry, lines with an object per entry records (as
    :func:`records.decode_chunk` gives them). None: a chunk mixing both forms, or one with a problem
    :func:`records.decode_chunk` names (errors name the chunk's line, as it names them)."""
    try:
        lines = _line_decoder.decode_lines(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    cols = [r for r in map(_get_requests, lines) if type(r) is RawColumns]
    if not cols:
        steps = records.as_records(lines, path, data)
        return steps, records.validate_steps(steps, path, data, prev=prev)
    if len(cols) < len(lines) or (columns := raw_columns(cols)) is None:
        return None
    times = StepTimes.of(lines)
    check_times(times, path, data, StepTimes.of([prev]) if isinstance(prev, StepRecord) else prev)
    slot, slot_ids, (pre, dec, ctx), offsets = columns
    e = EntryArrays(None, slot, slot_ids, pre, dec, ctx, offsets, meta=ColumnMeta(cols, offsets))
    check_entries(e, path, data)
    return times, e


def _compact_columns(data: bytes | memoryview, path: str, prev: StepRecord | StepTimes | None):
    """:func:`step_columns` keeping of the lines only the metadata the rule reads (the lines freed)."""
    out = step_columns(data, path, prev)
    if out is not None and isinstance(out[1].meta, ColumnMeta):
        out[1].meta = chunkmeta.sparse(out[1], path, (0, 0), data)
    return out


def _in_worker() -> bool:
    """A process that is itself a worker (``attribute --instances --jobs``): its siblings use the cores."""
    import multiprocessing

    return multiprocessing.parent_process() is not None


def _chunk_bounds(fd: int, size: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """The byte ranges :func:`records.iter_step_chunks` decodes: it reads ``chunk_bytes`` at a time and
    cuts after the last newline read; what follows the file's last newline is the final chunk."""
    start, end = 0, 0
    while end < size:
        end = min(end + chunk_bytes, size)
        cut = _last_newline(fd, start, end)
        if cut > start:
            yield start, cut
            start = cut
    if start < size:
        yield start, size


def _last_newline(fd: int, start: int, end: int) -> int:
    """The offset just past the last newline in [start, end) (``start`` if there is none)."""
    window = 1 << 16
    hi = end
    while hi > start:
        lo = max(start, hi - window)
        k = os.pread(fd, hi - lo, lo).rfind(b"\n")
        if k >= 0:
            return lo + k + 1
        hi, window = lo, window * 2
    return start


def _sequential_chunk(fd: int, path: str, span: tuple[int, int], prev: StepTimes | None):
    data = os.pread(fd, span[1] - span[0], span[0])
    return records.decode_chunk(data, path, prev, lambda: os.pread(fd, span[0], 0).count(b"\n"), _compact_columns)


def _worker_init(parent: int, scan) -> None:
    """A worker ignores Ctrl-C (the parent stops the pool) and dies with the parent (Linux)."""
    chunkmeta.flag = scan
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _decode_chunk(path: str, start: int, end: int) -> tuple[StepTimes, EntryArrays] | None:
    """A worker's part: the chunk's steps as columns, validated within the chunk (None: a problem the
    parent names)."""
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), end - start, start)
    try:
        with records.gc_paused():  # the lines freed before the collector could traverse them
            out = step_columns(data, path, None)
            if out is None:
                return None
            steps, e = out
            meta = chunkmeta.sparse(e, path, (start, end))
            del out, e.meta
    except InputError:
        return None
    times = steps if isinstance(steps, StepTimes) else StepTimes.of(steps)
    e.reqs = None
    cols = (e.slot, e.prefill, e.decode, e.context)
    slot, pre, dec, ctx = (c.astype(np.int32) for c in cols)  # counts validated below 2**24
    return times, EntryArrays(None, slot, e.slot_ids, pre, dec, ctx, e.offsets, meta=meta)
