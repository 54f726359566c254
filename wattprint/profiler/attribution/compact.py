"""A trace held compactly for offline attribution: per-entry int32 columns (16 bytes an entry instead of
the ~500 of parsed records), per-step aggregates of the cost model, and the request table's metadata.
Built chunk by chunk (:func:`wattprint.profiler.core.records.iter_step_chunks`; Parquet straight from its
columns, :func:`wattprint.profiler.core.tracefiles.iter_step_columns_parquet`), so that a file is never
held as Python objects all at once; the split then runs over ranges of steps."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from wattprint.errors import InputError
from wattprint.profiler.attribution.columns import StepColumns, columns_from_steps
from wattprint.profiler.attribution.table import RequestTable, note_metadata
from wattprint.profiler.core.costmodel import ModelGeometry
from wattprint.profiler.core.records import EntryArrays, StepRecord, StepTimes

_I32 = np.iinfo(np.int32).max
SPLIT_ENTRIES = 1 << 18  # entries per range of the split


class CompactTrace:
    """Steps appended in order; :meth:`step_columns` for the fit and settlement, :meth:`ranges` and
    :meth:`columns` for the split."""

    def __init__(self, g: ModelGeometry):
        self.g = g
        self.table = RequestTable()
        self._steps: dict[str, list[np.ndarray]] = {k: [] for k in ("t_start", "t_end", "flops", "bytes",
                                                                    "tokens", "counts")}
        self._entries: dict[str, list[np.ndarray]] = {k: [] for k in ("req", "prefill", "decode", "context")}
        self._cat: dict[str, np.ndarray] | None = None

    def add(self, steps: list[StepRecord] | StepTimes, entries: EntryArrays | None = None) -> None:
        """Append a run of steps (in time order, after those already added): records, or columns with
        their ``entries`` (a columnar file read without a Python object per entry)."""
        if not len(steps):
            return
        cols = columns_from_steps(steps, self.g, self.table.slots, self.table.ids, entries)
        self.table.ensure(len(self.table.ids))
        note_metadata(self.table, [r for s in steps for r in s.requests] if entries is None else entries, cols.req)
        for name, col in (("prefill", cols.prefill), ("decode", cols.decode), ("context", cols.context)):
            if len(col) and col.max() > _I32:
                raise InputError(f"a {name} token count above {_I32} cannot be a real request")
        s, e = self._steps, self._entries
        s["t_start"].append(cols.t_start)
        s["t_end"].append(cols.t_end)
        s["flops"].append(cols.step_flops)
        s["bytes"].append(cols.step_bytes)
        s["tokens"].append(cols.step_tokens)
        s["counts"].append(np.diff(cols.offsets))
        e["req"].append(cols.req.astype(np.int32))
        for name in ("prefill", "decode", "context"):
            e[name].append(getattr(cols, name).astype(np.int32))
        self._cat = None

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._cat is None:
            self._cat = {}
            for k, v in {**self._steps, **self._entries}.items():  # one column at a time, one copy kept
                self._cat[k] = np.concatenate(v) if v else np.zeros(0)
                v[:] = [self._cat[k]]
            offsets = np.zeros(len(self._cat["counts"]) + 1, dtype=np.int64)
            np.cumsum(self._cat["counts"], out=offsets[1:])
            self._cat["offsets"] = offsets
        return self._cat

    @property
    def n_steps(self) -> int:
        return len(self._arrays()["t_start"])

    def step_columns(self) -> StepColumns:
        """The whole trace at step level (what the fit and the settlement need; no entries)."""
        a = self._arrays()
        return StepColumns.steps_only(a["t_start"], a["t_end"], a["flops"], a["bytes"], a["tokens"], self.table.ids)

    def ranges(self, max_entries: int = SPLIT_ENTRIES) -> Iterator[tuple[int, int]]:
        """Step ranges [i0, i1) of about ``max_entries`` entries each."""
        offsets = self._arrays()["offsets"]
        n = len(offsets) - 1
        i0 = 0
        while i0 < n:
            i1 = int(np.searchsorted(offsets, offsets[i0] + max_entries, side="right")) - 1
            i1 = min(max(i1, i0 + 1), n)
            yield i0, i1
            i0 = i1

    def columns(self, i0: int, i1: int) -> StepColumns:
        """Steps [i0, i1) with their entries and the cost model's per-entry quantities."""
        a = self._arrays()
        e0, e1 = int(a["offsets"][i0]), int(a["offsets"][i1])
        cols = StepColumns(
            t_start=a["t_start"][i0:i1], t_end=a["t_end"][i0:i1], offsets=a["offsets"][i0:i1 + 1] - e0,
            req=a["req"][e0:e1].astype(np.int64),  # int64: bincount converts any other index type first
            prefill=a["prefill"][e0:e1], decode=a["decode"][e0:e1], context=a["context"][e0:e1],  # int32 views
            ids=self.table.ids)
        return cols.derive(self.g)
