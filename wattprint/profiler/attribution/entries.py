"""A batch's entries as the sidecar's ingestion check extracted them, once: the records with the columns
the intake reads (:class:`Entries`) and their token columns with each step's entry count
(:class:`EntryColumns`), handed to :meth:`OnlineAttributor.add_steps`."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import compress

import numpy as np


class Entries(list):
    """Entries (flattened, in order) with the columns the intake reads, taken once: ``ids``,
    ``finished`` (indices of the entries marked finished), ``given`` (indices of the entries giving an
    output count) and ``output`` (those counts)."""

    __slots__ = ("ids", "finished", "given", "output")

    @classmethod
    def of(cls, reqs: Sequence, ids: list[str] | None = None) -> Entries:
        e = cls(reqs)
        e.ids = [r.id for r in reqs] if ids is None else ids
        e.finished = [i for i, r in enumerate(reqs) if r.finished]
        outs = [r.output_tokens for r in reqs]
        e.given = [] if outs.count(None) == len(outs) else [i for i, x in enumerate(outs) if x is not None]
        e.output = [outs[i] for i in e.given]
        return e

    def select(self, mask: np.ndarray) -> Entries:
        """The entries where ``mask`` (one bool per entry) holds."""
        keep = mask.tolist()
        return Entries.of(list(compress(self, keep)), list(compress(self.ids, keep)))


class EntryColumns(tuple):
    """The (prefill, decode, context) int64 token columns of a batch's entries (a 3-tuple, as
    :func:`entry_columns` gives), with the entries themselves (:class:`Entries`, ``entries``) and each
    step's entry count (``counts``): everything the add needs, extracted once by the ingestion check."""

    entries: Entries
    counts: np.ndarray

    def __new__(cls, prefill: np.ndarray, decode: np.ndarray, context: np.ndarray, entries: Entries,
                counts: np.ndarray) -> EntryColumns:
        self = super().__new__(cls, (prefill, decode, context))
        self.entries, self.counts = entries, counts
        return self

    def select(self, steps: Sequence[int]) -> EntryColumns:
        """The columns of the steps ``steps`` (indices, increasing)."""
        keep = np.zeros(len(self.counts), dtype=bool)
        keep[list(steps)] = True
        mask = np.repeat(keep, self.counts)
        return EntryColumns(*(c[mask] for c in self), self.entries.select(mask), self.counts[keep])
