"""The request metadata of a chunk of steps read into columns, kept sparse: of its entries' optional
fields, only those the request-metadata rule reads (``attribution.table.note_metadata``), so that a
chunk's lines are freed once read, and a worker's result crosses the pipe without them.

:data:`flag` is set while a steps file is read (shared with the reading workers): it becomes 1 once a
chunk's metadata needed more than each request's first and last entry, and later chunks are then
scanned for each request's first stratum and prompt length.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import chain, compress, repeat
from operator import attrgetter, is_not

import numpy as np

from wattprint.profiler.core import records
from wattprint.profiler.core.records import EntryArrays

flag = None  # while a steps file is read: shared, set once a request's metadata needed a scan
_get_stratum, _get_prompt = attrgetter("stratum"), attrgetter("prompt_tokens")
_NO_META = (None, None, None)


class Flag:
    """:data:`flag` for a file read by this process alone."""

    value = 0


def sparse(e: EntryArrays, path: str, span: tuple[int, int], data: bytes | memoryview | None = None) -> SparseMeta:
    """The metadata of the entries ``e`` (bytes ``span`` of ``path``, or ``data``) the rule reads."""
    scan = flag is None or bool(flag.value)
    return SparseMeta(needed_metadata(e, scan), scan, path, span, None if scan else data)


class SparseMeta:
    """The optional fields of the entries the request-metadata rule reads: each request's first and last
    entry in the chunk and, ``scanned``, its first giving a stratum, and a prompt length (others read as
    not given: the rule takes the first stratum and prompt length given and the output count of the last
    entry, so it finds in these what it finds in all). Not ``scanned`` (a request whose first entry here
    lacks them is most often one whose earlier chunk gave them: the rule looks no further), the rule's
    asking for other entries decodes the chunk again here, and has later chunks scanned."""

    def __init__(self, values: dict[int, tuple], scanned: bool, path: str, span: tuple[int, int],
                 data: bytes | memoryview | None = None):
        self.values, self.scanned, self.path, self.span, self.data = values, scanned, path, span, data

    def __call__(self, idx: list[int]) -> tuple[list, list, list]:
        if not self.scanned and not all(map(self.values.__contains__, idx)):
            if flag is not None:
                flag.value = 1
            with open(self.path, "rb") as f, records.gc_paused():
                lines = records._step_decoder.decode_lines(self.data if self.data is not None else
                                                           os.pread(f.fileno(), self.span[1] - self.span[0], self.span[0]))
            steps = records.as_records(lines, self.path, None)
            return records.entry_metadata(list(chain.from_iterable(s.requests for s in steps)), idx)
        rows = list(map(self.values.get, idx, repeat(_NO_META)))
        if not rows:
            return [], [], []
        return tuple(map(list, zip(*rows)))


def needed_metadata(e: EntryArrays, scan: bool) -> dict[int, tuple]:
    slot, n = e.slot, len(e.slot)
    if not n:
        return {}
    pos = np.arange(n)
    first = np.full(int(slot.max()) + 1, n)
    first[slot[::-1]] = pos[::-1]
    last = np.zeros(len(first), dtype=np.int64)
    last[slot] = pos
    keep = [first, last]
    if scan:
        strata, prompts, _ = e.metadata(first.tolist())
        if None in strata:  # each request's first entry giving a stratum (the rule's own test)
            keep.append(_firsts(slot, _giving(e, "stratum")))
        if not all(prompts):  # and a prompt length
            keep.append(_firsts(slot, _giving(e, "prompt_tokens")))
    keep_list = np.unique(np.concatenate(keep)).tolist()
    return dict(zip(keep_list, zip(*e.metadata(keep_list))))


def _giving(e: EntryArrays, name: str):
    """The entries giving a stratum (not null), or a prompt length (not null nor 0)."""
    if e.reqs is None:
        return e.meta.given(name, truthy=name == "prompt_tokens")
    if name == "stratum":
        return compress(range(len(e.reqs)), map(is_not, map(_get_stratum, e.reqs), repeat(None)))
    return compress(range(len(e.reqs)), map(_get_prompt, e.reqs))


def _firsts(slot: np.ndarray, indices: Iterator[int]) -> np.ndarray:
    idx = np.fromiter(indices, np.int64)
    return idx[np.unique(slot[idx], return_index=True)[1]]
