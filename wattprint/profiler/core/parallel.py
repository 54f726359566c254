"""``steps.jsonl`` decoded on the cores the process may use: forked workers decode chunks of whole lines
into their columns (no Python object per entry crosses the pipe), this process too while the next chunk
is not ready; it takes the chunks in file order, a bounded number ahead, and checks the order across them.

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
from itertools import chain, compress, repeat
from operator import attrgetter, is_not
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from wattprint.errors import InputError
from wattprint.profiler.core import records
from wattprint.profiler.core.records import EntryArrays, StepTimes, check_entries, check_times, entry_metadata

if TYPE_CHECKING:
    from concurrent.futures import Future

CHUNK_BYTES = 8 << 20
_get_stratum, _get_prompt, _get_requests = attrgetter("stratum"), attrgetter("prompt_tokens"), attrgetter("requests")
_scan = None  # while chunks are read in parallel: shared, set once a request's metadata needed a scan
_NO_META = (None, None, None)


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
        yield from records.iter_step_chunks(path, chunk_bytes)
        return
    yield from _parallel(str(path), size, chunk_bytes, cores)


def _parallel(path: str, size: int, chunk_bytes: int, cores: int) -> Iterator[tuple[StepTimes | list, EntryArrays]]:
    """``cores - 1`` forked workers kept fed with chunks (two each); this process takes them in order,
    and decodes a later chunk itself while the next is not ready (at most ``2 * cores`` chunks ahead:
    bounded memory, whichever core is the slower)."""
    import multiprocessing  # here: ~20 ms of imports the sequential path does without
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    global _scan
    _scan = multiprocessing.get_context("fork").RawValue("b", 0)  # shared with the workers
    pool = ProcessPoolExecutor(cores - 1, mp_context=multiprocessing.get_context("fork"),
                               initializer=_worker_init, initargs=(os.getpid(), _scan))
    try:
        with open(path, "rb") as f:
            bounds, spans = _chunk_bounds(f.fileno(), size, chunk_bytes), []

            def take() -> int | None:  # the next chunk's number (None: the file is done)
                span = next(bounds, None)
                return None if span is None else spans.append(span) or len(spans) - 1

            futures: dict[int, Future] = {}
            here: dict[int, tuple | None] = {}  # chunks decoded here ahead of their turn
            prev: StepTimes | None = None
            i, broken = 0, False
            while True:
                while not broken and len(futures) < 2 * (cores - 1) and len(spans) - i < 2 * cores \
                        and (j := take()) is not None:
                    futures[j] = pool.submit(_decode_chunk, path, *spans[j])  # the workers fed
                if i == len(spans) and take() is None:
                    break
                if i in futures and not futures[i].done() and len(spans) - i < 2 * cores \
                        and (j := take()) is not None:  # not ready: take a later chunk meanwhile
                    here[j] = _decode_chunk(path, *spans[j])
                    continue
                try:
                    out = here.pop(i) if i in here else futures.pop(i).result() if i in futures else None
                except BrokenProcessPool:  # a worker was killed (out of memory?): the rest is read here
                    out, broken = None, True
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
        pool.shutdown(wait=True, cancel_futures=True)
        _scan = None
    if prev is None:
        raise InputError("no steps", path)


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
    return records.decode_chunk(data, path, prev, lambda: os.pread(fd, span[0], 0).count(b"\n"))


def _worker_init(parent: int, scan) -> None:
    """A worker ignores Ctrl-C (the parent stops the pool) and dies with the parent (Linux)."""
    global _scan
    _scan = scan
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
        with records.gc_paused():
            steps = records._step_decoder.decode_lines(data)
        del data
        times = StepTimes.of(steps)
        check_times(times, path, None)
        e = records.entry_arrays(steps)
        check_entries(e, path, None)
    except (InputError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    scan = _scan is None or bool(_scan.value)
    meta = SparseMeta(_needed_metadata(e.reqs, e.slot, scan), scan, path, (start, end))
    e.reqs = None
    cols = (e.slot, e.prefill, e.decode, e.context)
    slot, pre, dec, ctx = (c.astype(np.int32) for c in cols)  # counts validated below 2**24
    return times, EntryArrays(None, slot, e.slot_ids, pre, dec, ctx, e.offsets, meta=meta)


class SparseMeta:
    """The optional fields of the entries the request-metadata rule reads: each request's first and last
    entry in the chunk and, ``scanned``, its first giving a stratum, and a prompt length (others read as
    not given: the rule takes the first stratum and prompt length given and the output count of the last
    entry, so it finds in these what it finds in all). Not ``scanned`` (a request whose first entry here
    lacks them is most often one whose earlier chunk gave them: the rule looks no further), the rule's
    asking for other entries decodes the chunk again here, and has later chunks scanned."""

    def __init__(self, values: dict[int, tuple], scanned: bool, path: str, span: tuple[int, int]):
        self.values, self.scanned, self.path, self.span = values, scanned, path, span

    def __call__(self, idx: list[int]) -> tuple[list, list, list]:
        if not self.scanned and not all(map(self.values.__contains__, idx)):
            if _scan is not None:
                _scan.value = 1
            with open(self.path, "rb") as f, records.gc_paused():
                steps = records._step_decoder.decode_lines(os.pread(f.fileno(), self.span[1] - self.span[0],
                                                                    self.span[0]))
            return entry_metadata(list(chain.from_iterable(map(_get_requests, steps))), idx)
        rows = list(map(self.values.get, idx, repeat(_NO_META)))
        if not rows:
            return [], [], []
        return tuple(map(list, zip(*rows)))


def _needed_metadata(reqs: list, slot: np.ndarray, scan: bool) -> dict[int, tuple]:
    n = len(slot)
    if not n:
        return {}
    pos = np.arange(n)
    first = np.full(int(slot.max()) + 1, n)
    first[slot[::-1]] = pos[::-1]
    last = np.zeros(len(first), dtype=np.int64)
    last[slot] = pos
    keep = [first, last]
    if scan:
        strata, prompts, _ = entry_metadata(reqs, first.tolist())
        if None in strata:  # each request's first entry giving a stratum (the rule's own test)
            keep.append(_firsts(slot, compress(range(n), map(is_not, map(_get_stratum, reqs), repeat(None)))))
        if not all(prompts):  # and a prompt length
            keep.append(_firsts(slot, compress(range(n), map(_get_prompt, reqs))))
    return _values(reqs, keep)


def _firsts(slot: np.ndarray, indices: Iterator[int]) -> np.ndarray:
    idx = np.fromiter(indices, np.int64)
    return idx[np.unique(slot[idx], return_index=True)[1]]


def _values(reqs: list, keep: list[np.ndarray]) -> dict[int, tuple]:
    keep_list = np.unique(np.concatenate(keep)).tolist()
    return dict(zip(keep_list, zip(*entry_metadata(reqs, keep_list))))
