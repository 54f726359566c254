"""A run of steps as arrays: one row per step, one per request-step entry, with the cost model's
per-entry and per-step quantities (v1 cost model, :mod:`wattprint.profiler.core.costmodel`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

from wattprint.profiler.core import costmodel as cm
from wattprint.profiler.core.costmodel import ModelGeometry
from wattprint.profiler.core.records import EntryArrays, StepRecord, StepTimes, entry_arrays


@dataclass
class StepColumns:
    """A run of steps as arrays (one row per step, one per request-step entry)."""

    t_start: np.ndarray
    t_end: np.ndarray
    offsets: np.ndarray  # entries of step i are offsets[i]:offsets[i+1]
    req: np.ndarray  # entry -> request slot
    prefill: np.ndarray
    decode: np.ndarray
    context: np.ndarray
    ids: list[str]  # slot -> request id
    # per-entry cost-model quantities
    flops: np.ndarray = field(init=False)
    kv_read: np.ndarray = field(init=False)
    kv_write: np.ndarray = field(init=False)
    step_of: np.ndarray = field(init=False)
    # per-step features
    step_flops: np.ndarray = field(init=False)
    step_bytes: np.ndarray = field(init=False)
    step_tokens: np.ndarray = field(init=False)

    def derive(self, g: ModelGeometry) -> StepColumns:
        n_steps = len(self.t_start)
        counts = np.diff(self.offsets)
        self.step_of = np.repeat(np.arange(n_steps), counts)
        new = (self.prefill + self.decode).astype(float)
        ctx = self.context.astype(float)
        self.flops = cm.request_flops(g, new, ctx)
        self.kv_read = cm.kv_read_bytes(g, ctx).astype(float)
        self.kv_write = cm.kv_write_bytes(g, new).astype(float)
        self.step_flops = self.step_sums(self.flops)
        kv = self.step_sums(self.kv_read + self.kv_write)
        self.step_bytes = kv + float(g.weight_bytes)
        self.step_tokens = self.step_sums(new)
        return self

    def step_sums(self, x: np.ndarray) -> np.ndarray:
        """Per step, the sum of a per-entry quantity (each step's entries are contiguous: segment sums,
        several times faster than ``bincount`` by step)."""
        starts = self.offsets[:-1]
        out = np.zeros(len(starts))
        k = int(np.searchsorted(starts, len(x)))  # steps after the last entry hold none
        if k:
            out[:k] = np.add.reduceat(x, starts[:k])
            out[:k][starts[:k] == self.offsets[1:k + 1]] = 0.0  # a step without entries (reduceat gives x[start])
        return out

    @classmethod
    def steps_only(cls, t_start, t_end, step_flops, step_bytes, step_tokens, ids) -> StepColumns:
        """Step-level columns without entries (the fit and the settlement need no more)."""
        empty = np.zeros(0, dtype=np.int64)
        cols = cls(t_start=t_start, t_end=t_end, offsets=np.zeros(len(t_start) + 1, dtype=np.int64), req=empty,
                   prefill=empty, decode=empty, context=empty, ids=ids)
        cols.step_flops, cols.step_bytes, cols.step_tokens = step_flops, step_bytes, step_tokens
        return cols

    @property
    def dt(self) -> np.ndarray:
        return np.maximum(self.t_end - self.t_start, 1e-9)


def columns_from_steps(steps: Sequence[StepRecord] | StepTimes, g: ModelGeometry,
                       slots: dict[str, int] | None = None, ids: list[str] | None = None,
                       entries: EntryArrays | None = None) -> StepColumns:
    """Turn step records into :class:`StepColumns`; ``slots``/``ids`` intern request ids (shared
    across calls). ``entries``: the columns already extracted by :func:`records.load_steps` (required
    when ``steps`` are columns)."""
    slots = {} if slots is None else slots
    ids = [] if ids is None else ids
    e = entries if entries is not None else entry_arrays(list(steps))
    if not slots:  # a fresh table: adopt the entries' own interning
        slots.update(zip(e.slot_ids, range(len(e.slot_ids))))
        ids.extend(e.slot_ids)
        req = e.slot
    else:  # running table (online): map the entries' slots onto it
        for rid in e.slot_ids:
            if rid not in slots:
                slots[rid] = len(ids)
                ids.append(rid)
        req = np.fromiter(map(slots.__getitem__, e.slot_ids), np.int64, len(e.slot_ids))[e.slot]
    n = len(steps)
    cols = StepColumns(
        t_start=steps.t_start if isinstance(steps, StepTimes) else np.fromiter(map(_T0, steps), float, n),
        t_end=steps.t_end if isinstance(steps, StepTimes) else np.fromiter(map(_T1, steps), float, n),
        offsets=e.offsets, req=req, prefill=e.prefill, decode=e.decode, context=e.context, ids=ids,
    )
    return cols.derive(g)


_T0, _T1 = attrgetter("t_start"), attrgetter("t_end")
