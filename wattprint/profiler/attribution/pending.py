"""The online driver's unsettled steps, held compactly: per-step times and per-entry int32 columns (request
slot, prefill, decode and context tokens: 16 bytes an entry instead of the ~500 of parsed records) in
buffers that grow by doubling and drop settled steps from their head; and the per-batch request intake
(slots, first-seen metadata, finished flags, the engine's output counts), vectorised over a batch's
entries, whose columns (:class:`EntryColumns`, :class:`Entries`) the sidecar's ingestion check takes
once (issue 9: 2,000 steps/s x 64 entries in well under half a core)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter, is_not, itemgetter

import numpy as np

from wattprint.errors import InputError
from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.attribution.entries import Entries, EntryColumns
from wattprint.profiler.attribution.table import RequestTable
from wattprint.profiler.core.costmodel import ModelGeometry

_I32 = np.iinfo(np.int32).max
_pre, _dec, _ctx = (attrgetter(f) for f in ("prefill_tokens", "decode_tokens", "context_tokens"))
_st, _prompt, _reqs = attrgetter("stratum"), attrgetter("prompt_tokens"), attrgetter("requests")
_ENTRY = ("slot", "prefill", "decode", "context")


class PendingSteps:
    """Steps received and not yet wholly settled, in arrival (time) order, as columns."""

    def __init__(self, steps: int = 1024, entries: int = 1 << 16):
        self._s = {"t_start": np.empty(steps), "t_end": np.empty(steps), "first": np.empty(steps, np.int64),
                   "seq": np.empty(steps, np.int64)}  # first: its first entry; seq: its number in arrival order
        self._e = {k: np.empty(entries, np.int32) for k in _ENTRY}
        self._s0 = self._sn = self._e0 = self._en = 0  # live steps [s0, sn), live entries [e0, en)
        self.next_seq = 0  # the arrival number of the next step appended

    def __len__(self) -> int:
        return self._sn - self._s0

    @property
    def n_entries(self) -> int:
        return self._en - self._e0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in chain(self._s.values(), self._e.values()))

    def col(self, name: str) -> np.ndarray:
        """A live column (a view): a step column or an entry column."""
        if name in self._s:
            return self._s[name][self._s0:self._sn]
        return self._e[name][self._e0:self._en]

    def append(self, t_start: np.ndarray, t_end: np.ndarray, counts: np.ndarray, slot: np.ndarray,
               prefill: np.ndarray, decode: np.ndarray, context: np.ndarray, seq: np.ndarray | None = None) -> None:
        """Append a batch of steps (after those held) and their entries; they are numbered from
        :attr:`next_seq` on (``seq``: numbers kept from before, when the store is rebuilt)."""
        n, m = len(t_start), len(slot)
        for name, c in (("prefill", prefill), ("decode", decode), ("context", context)):
            if m and c.max() > _I32:
                raise InputError(f"a {name} token count above {_I32} cannot be a real request")
        self._reserve(n, m)
        s, e, sn, en = self._s, self._e, self._sn, self._en
        s["t_start"][sn:sn + n] = t_start
        s["t_end"][sn:sn + n] = t_end
        if seq is None:
            s["seq"][sn:sn + n] = np.arange(self.next_seq, self.next_seq + n)
            self.next_seq += n
        else:
            s["seq"][sn:sn + n] = seq
        first = s["first"][sn:sn + n]
        first[0:1] = en
        np.cumsum(counts[:-1], out=first[1:])
        first[1:] += en
        for name, c in (("slot", slot), ("prefill", prefill), ("decode", decode), ("context", context)):
            e[name][en:en + m] = c
        self._sn += n
        self._en += m

    def _reserve(self, n: int, m: int) -> None:
        """Room for ``n`` more steps and ``m`` more entries: the live part moves to the front when the
        settled head is over half a buffer or there is no room at the end; a buffer grows by half when
        the live part fills three quarters of it, and shrinks when it fills less than an eighth."""
        for bufs, lo, hi, extra, is_step in ((self._s, self._s0, self._sn, n, True),
                                            (self._e, self._e0, self._en, m, False)):
            cap = len(next(iter(bufs.values())))
            if hi + extra <= cap and lo <= cap // 2:
                continue
            live = hi - lo
            need = live + extra
            new_cap = cap if cap // 8 <= need <= 3 * cap // 4 else max(need + need // 2, 1024)
            for k, a in bufs.items():
                if new_cap == cap:
                    a[:live] = a[lo:hi]  # numpy copies overlapping ranges correctly
                else:
                    b = np.empty(new_cap, a.dtype)
                    b[:live] = a[lo:hi]
                    bufs[k] = b
            if is_step:
                self._s0, self._sn = 0, live
            else:
                self._s["first"][self._s0:self._sn] -= lo
                self._e0, self._en = 0, live

    def offsets(self, i0: int, i1: int) -> np.ndarray:
        """Entry offsets of live steps [i0, i1), relative to the first one's first entry."""
        first = self._s["first"][self._s0 + i0: self._s0 + i1]
        end = self._s["first"][self._s0 + i1] if self._s0 + i1 < self._sn else self._en
        return np.append(first, end) - first[0] if len(first) else np.zeros(1, np.int64)

    def columns(self, steps: np.ndarray, g: ModelGeometry, ids: list[str]) -> StepColumns:
        """Live steps ``steps`` (indices, increasing) with their entries and the cost model's quantities."""
        s0 = self._s0
        if len(steps) and steps[-1] - steps[0] + 1 == len(steps):  # a run (the usual case): slices
            i0, i1 = int(steps[0]), int(steps[-1]) + 1
            off = self.offsets(i0, i1)
            e0 = int(self._s["first"][s0 + i0]) if i1 > i0 else self._e0
            sl = slice(e0, e0 + int(off[-1]))
            ent = {k: self._e[k][sl] for k in _ENTRY}
        else:
            first = self._s["first"][s0 + steps]
            nxt = np.append(self._s["first"][s0 + 1:self._sn], self._en)[steps]
            counts = nxt - first
            off = np.zeros(len(steps) + 1, np.int64)
            np.cumsum(counts, out=off[1:])
            idx = np.repeat(first - off[:-1], counts) + np.arange(int(off[-1]))
            ent = {k: self._e[k][idx] for k in _ENTRY}
        cols = StepColumns(t_start=self._s["t_start"][s0 + steps], t_end=self._s["t_end"][s0 + steps], offsets=off,
                           req=ent["slot"].astype(np.int64), prefill=ent["prefill"].astype(np.int64),
                           decode=ent["decode"].astype(np.int64), context=ent["context"].astype(np.int64), ids=ids)
        return cols.derive(g)

    def drop_settled(self, end: float) -> None:
        """Forget the steps that ended by ``end`` (wholly settled)."""
        keep = self.col("t_end") > end
        k = int(np.argmax(keep)) if keep.any() else len(keep)
        if keep[k:].all():  # the usual case: a head of settled steps
            self._s0 += k
            self._e0 = int(self._s["first"][self._s0]) if self._s0 < self._sn else self._en
            if self._s0 == self._sn:
                self._s0 = self._sn = self._e0 = self._en = 0
            return
        idx = np.flatnonzero(keep)  # steps out of time order by up to the order check's slack
        first = self._s["first"][self._s0 + idx]
        nxt = np.append(self._s["first"][self._s0 + 1:self._sn], self._en)[idx]
        counts = nxt - first
        ent_idx = np.repeat(first, counts) + (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts,
                                                                                        counts))
        kept_s = {k_: self._s[k_][self._s0 + idx].copy() for k_ in ("t_start", "t_end", "seq")}
        kept_e = {k_: self._e[k_][ent_idx].copy() for k_ in _ENTRY}
        self._s0 = self._sn = self._e0 = self._en = 0
        if len(idx):
            self.append(kept_s["t_start"], kept_s["t_end"], counts, *(kept_e[k_] for k_ in _ENTRY), seq=kept_s["seq"])

    def remap(self, mapping: np.ndarray) -> None:
        """Renumber the live entries' request slots (``mapping[old] = new``: the table was compacted)."""
        live = self.col("slot")
        live[:] = mapping[live]

    def steps_of(self, slot: int, after_s: float, seq_lo: int = 0, seq_hi: int | None = None) -> np.ndarray:
        """Indices of the live steps holding ``slot`` that end after ``after_s``, looked for among the
        steps numbered ``seq_lo`` to ``seq_hi`` (the request's first and last: the work is in its span)."""
        seq = self.col("seq")
        i0 = int(np.searchsorted(seq, seq_lo, side="left"))
        i1 = len(seq) if seq_hi is None else int(np.searchsorted(seq, seq_hi, side="right"))
        if i1 <= i0:
            return np.zeros(0, np.int64)
        first = self._s["first"][self._s0 + i0:self._s0 + i1]
        e_hi = int(self._s["first"][self._s0 + i1]) if self._s0 + i1 < self._sn else self._en
        hits = np.flatnonzero(self._e["slot"][int(first[0]):e_hi] == slot) + int(first[0])
        steps = np.unique(np.searchsorted(first, hits, side="right") - 1) + i0
        return steps[self.col("t_end")[steps] > after_s]


class Intake:
    """Per batch: each entry's table slot (a new record for an id first seen, or seen again after it
    was emitted), and the request-metadata rule of :func:`~wattprint.profiler.attribution.table.note_metadata`
    (first stratum and prompt length given; cached tokens from the first entry; the largest output count
    given), with per-entry work in C loops and Python work per new request only."""

    def __init__(self, table: RequestTable):
        self.table = table
        self.last_t = np.zeros(0)  # slot -> end of the latest step holding it
        self.seq = np.zeros((2, 0), np.int64)  # slot -> arrival numbers of its first and last steps
        self.lacking: set[int] = set()  # slots still without a stratum or a prompt length

    def slots(self, reqs: Sequence, entry_t_end: np.ndarray, stratum_of: Callable | None,
              entry_seq: np.ndarray | None = None) -> np.ndarray:
        """Each entry's table slot (entries in time order; ``entry_seq``: the arrival number of each
        entry's step, :attr:`PendingSteps.next_seq` on)."""
        t = self.table
        n = len(reqs)
        cols = reqs if isinstance(reqs, Entries) else Entries.of(reqs)
        ids, get = cols.ids, t.slots.get
        sl = np.fromiter(map(get, ids, repeat(-1)), np.int64, n)
        new = np.flatnonzero(sl < 0)
        if len(new):
            for i in new.tolist():
                rid = ids[i]
                k = t.slots.get(rid)
                if k is None:
                    k = t.slots[rid] = len(t.ids)
                    t.ids.append(rid)
                    self._first_sight(k, reqs[i], stratum_of)
                sl[i] = k
        t.ensure(len(t.ids))
        if len(self.last_t) < len(t.ids):
            grow = max(len(t.ids), 2 * len(self.last_t)) - len(self.last_t)
            self.last_t = np.concatenate([self.last_t, np.full(grow, -np.inf)])
            self.seq = np.concatenate([self.seq, np.tile(np.array([[np.iinfo(np.int64).max], [-1]]), grow)], axis=1)
        np.maximum.at(self.last_t, sl, entry_t_end)
        if entry_seq is not None:
            np.minimum.at(self.seq[0], sl, entry_seq)
            np.maximum.at(self.seq[1], sl, entry_seq)
        if cols.finished:
            t.finished.update(sl[cols.finished].tolist())
        if cols.given:
            col = t.col("given_output_tokens")
            for i, x in zip(cols.given, cols.output):
                if x > col[sl[i]]:
                    col[sl[i]] = x
        if self.lacking:
            self._fill_lacking(reqs, sl, stratum_of)
        return sl

    def _first_sight(self, k: int, r, stratum_of: Callable | None) -> None:
        t = self.table
        t.ensure(k + 1)
        if r.stratum is not None:
            t.stratum[k] = stratum_of(r.stratum) if stratum_of else r.stratum
        if r.prompt_tokens:
            t.col("prompt_tokens")[k] = r.prompt_tokens
        t.col("cached_tokens")[k] = r.context_tokens if r.prefill_tokens > 0 else 0
        if t.stratum.get(k) is None or not r.prompt_tokens:
            self.lacking.add(k)

    def _fill_lacking(self, reqs: Sequence, sl: np.ndarray, stratum_of: Callable | None) -> None:
        idx = np.flatnonzero(np.isin(sl, np.fromiter(self.lacking, np.int64, len(self.lacking))))
        if not len(idx):
            return
        sub = [reqs[i] for i in idx.tolist()] if len(idx) < 2 else list(itemgetter(*idx.tolist())(reqs))
        gives = np.fromiter(map(is_not, map(_st, sub), repeat(None)), bool, len(sub))
        gives |= np.fromiter(map(bool, map(_prompt, sub)), bool, len(sub))
        t = self.table
        prompt = t.col("prompt_tokens")
        for j in np.flatnonzero(gives).tolist():
            r, k = sub[j], int(sl[idx[j]])
            if t.stratum.get(k) is None and r.stratum is not None:
                t.stratum[k] = stratum_of(r.stratum) if stratum_of else r.stratum
            if not prompt[k] and r.prompt_tokens:
                prompt[k] = r.prompt_tokens
            if t.stratum.get(k) is not None and prompt[k]:
                self.lacking.discard(k)

    def forget(self, emitted: set[int]) -> None:
        """Emitted slots: a later entry with the same id starts a new record."""
        t = self.table
        for k in emitted:
            if t.slots.get(t.ids[k]) == k:
                del t.slots[t.ids[k]]
        self.lacking -= emitted

    def compacted(self, table: RequestTable, keep: np.ndarray) -> np.ndarray:
        """The table was rebuilt with the slots ``keep`` (in order); returns old slot -> new slot (-1: gone)."""
        mapping = np.full(max(len(self.table.ids), 1), -1, np.int64)
        mapping[keep] = np.arange(len(keep))
        self.last_t = self.last_t[keep] if len(keep) else np.zeros(0)
        self.seq = self.seq[:, keep] if len(keep) else np.zeros((2, 0), np.int64)
        self.lacking = {int(mapping[k]) for k in self.lacking if mapping[k] >= 0}
        self.table = table
        return mapping


@dataclass
class Added:
    """What :meth:`~wattprint.profiler.attribution.online.OnlineAttributor.add_steps` did with a batch:
    indices (into the batch) of the steps accepted, of those whose time was already settled (``late``)
    and of the rejected ones, with why."""

    accepted: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    invalid: list[tuple[int, str]] = field(default_factory=list)


def classify(steps: Sequence, last: tuple[int, float] | None, settled: float | None
             ) -> tuple[Added, tuple[int, float] | None]:
    """Sort a batch into accepted, late and invalid steps (order against the last accepted one: a rejected
    or late step never becomes the previous step); returns them and the new last (number, t_end)."""
    added = Added()
    for i, step in enumerate(steps):
        if last is not None and (step.step <= last[0] or step.t_start < last[1] - 1e-6):
            added.invalid.append((i, f"step {step.step} arrived out of order (after step {last[0]})"))
        elif not step.t_end >= step.t_start:
            added.invalid.append((i, f"step {step.step} ends before it starts"))
        elif settled is not None and step.t_end <= settled:
            added.late.append(i)  # its time was already settled (as idle)
        else:
            added.accepted.append(i)
            last = (step.step, step.t_end)
    return added, last


def batch_columns(steps: Sequence, accepted: list[int], entries: tuple | None = None) -> tuple:
    """The accepted steps' start and end times, entry counts, entries flattened in order, and those
    entries' (prefill, decode, context) tokens (``entries``: the tokens of every entry of ``steps``,
    when the caller extracted them already; an :class:`EntryColumns` brings the entries' other columns
    too, and the entries come back as :class:`Entries`)."""
    batch = steps if len(accepted) == len(steps) else [steps[i] for i in accepted]
    n = len(batch)
    t0 = np.array([s.t_start for s in batch], float)
    t1 = np.array([s.t_end for s in batch], float)
    if isinstance(entries, EntryColumns):
        if batch is not steps:
            entries = entries.select(accepted)
        return t0, t1, entries.counts, entries.entries, tuple(entries)
    counts = np.fromiter(map(len, map(_reqs, batch)), np.int64, n)
    reqs = list(chain.from_iterable(map(_reqs, batch)))
    if entries is None:
        return t0, t1, counts, reqs, entry_columns(reqs)
    if batch is not steps:
        keep = np.zeros(len(steps), dtype=bool)
        keep[accepted] = True
        mask = np.repeat(keep, np.fromiter(map(len, map(_reqs, steps)), np.int64, len(steps)))
        entries = tuple(c[mask] for c in entries)
    return t0, t1, counts, reqs, entries


def entry_columns(reqs: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefill, decode and context tokens of entries (C loops)."""
    n = len(reqs)
    return tuple(np.fromiter(map(g, reqs), np.int64, n) for g in (_pre, _dec, _ctx))
