"""Running per-request sums and the totals' breakdowns, shared by the offline and online drivers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import numpy as np

from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.attribution.split import EntrySplit
from wattprint.profiler.core.efficiency import IdealCost
from wattprint.profiler.core.records import EntryArrays, RequestEntry, entry_metadata
from wattprint.profiler.core.results import RequestResult, Totals


class RequestTable:
    """Running per-request sums, in slots (arrays grow as requests appear)."""

    FIELDS = ("energy_j", "prefill_j", "decode_j", "kv_j", "compute_j", "weights_j", "static_j",
              "kv_read_bytes", "kv_write_bytes", "flops", "prefill_tokens", "decode_tokens", "t_start", "t_end",
              "prompt_tokens", "cached_tokens", "given_output_tokens")
    #: initial values of the columns that are not sums (-1: not known yet)
    _INITIAL = {"t_start": math.inf, "t_end": -math.inf, "cached_tokens": -1.0, "given_output_tokens": -1.0}

    def __init__(self, ideal: IdealCost | None = None):
        self.ideal = ideal  # grades results (efficiency classes), when the drivers know the hardware
        self.ids: list[str] = []
        self.slots: dict[str, int] = {}
        self.data = np.zeros((len(self.FIELDS), 0))
        self.stratum: dict[int, str | None] = {}
        self.finished: set[int] = set()
        self._col = {f: i for i, f in enumerate(self.FIELDS)}

    def ensure(self, n: int) -> None:
        if self.data.shape[1] < n:
            grow = max(n, 2 * self.data.shape[1], 64)
            new = np.zeros((len(self.FIELDS), grow))
            for name, value in self._INITIAL.items():
                new[self._col[name]] = value
            new[:, : self.data.shape[1]] = self.data
            self.data = new

    def col(self, name: str) -> np.ndarray:
        return self.data[self._col[name]]

    def add(self, cols: StepColumns, split: EntrySplit, count_tokens: np.ndarray | None = None) -> None:
        """Add entries' energy (already scaled) and, where ``count_tokens``, their tokens/bytes/FLOPs."""
        n = len(self.ids)
        self.ensure(n)
        req = cols.req
        bc = np.bincount
        e_pre = np.where(split.is_prefill, split.energy, 0.0)
        self.col("energy_j")[:n] += bc(req, split.energy, n)
        self.col("prefill_j")[:n] += bc(req, e_pre, n)
        self.col("decode_j")[:n] += bc(req, split.energy - e_pre, n)
        for name, part in (("kv_j", split.kv), ("compute_j", split.compute), ("weights_j", split.weights),
                           ("static_j", split.static)):
            self.col(name)[:n] += bc(req, part, n)
        w = None if count_tokens is None else count_tokens.astype(float)  # None: every entry counts
        if w is None or w.any():
            for name, x in (("kv_read_bytes", cols.kv_read), ("kv_write_bytes", cols.kv_write), ("flops", cols.flops),
                            ("prefill_tokens", cols.prefill), ("decode_tokens", cols.decode)):
                self.col(name)[:n] += bc(req, x if w is None else x * w, n)
            # entries are in time order: a request's first entry starts it, its last ends it
            # (fancy assignment keeps the last write, so write backwards for the first)
            r_idx, so = req, cols.step_of
            if w is not None:
                idx = np.flatnonzero(w > 0)
                r_idx, so = req[idx], so[idx]
            ts = np.full(n, math.inf)
            ts[r_idx[::-1]] = cols.t_start[so[::-1]]
            te = np.full(n, -math.inf)
            te[r_idx] = cols.t_end[so]
            np.minimum(self.col("t_start")[:n], ts, out=self.col("t_start")[:n])
            np.maximum(self.col("t_end")[:n], te, out=self.col("t_end")[:n])

    def without(self, drop: set[int]) -> RequestTable:
        """A new table without the slots in ``drop`` (the online driver forgets emitted requests)."""
        keep = [k for k in range(len(self.ids)) if k not in drop]
        new = RequestTable(self.ideal)
        new.ensure(len(keep))
        for j, k in enumerate(keep):
            new.ids.append(self.ids[k])
            new.slots[self.ids[k]] = j
            new.data[:, j] = self.data[:, k]
            if k in self.stratum:
                new.stratum[j] = self.stratum[k]
            if k in self.finished:
                new.finished.add(j)
        return new

    def result(self, slot: int, source: str, model: str | None, status: str = "final",
               add: dict[str, float] | None = None) -> RequestResult:
        """The record of a request; ``add``: amounts to add to its sums (a provisional prediction)."""
        d = dict(zip(self.FIELDS, self.data[:, slot].tolist()))
        for f, v in (add or {}).items():
            d[f] += v
        return self._result(slot, d, source, model, status)

    def results(self, source: str, model: str | None) -> list[RequestResult]:
        """The final records of every request, in slot order (the table read once)."""
        rows = self.data[:, :len(self.ids)].T.tolist()
        return [self._result(k, dict(zip(self.FIELDS, row)), source, model, "final") for k, row in enumerate(rows)]

    def _result(self, slot: int, d: dict[str, float], source: str, model: str | None, status: str) -> RequestResult:
        prompt, cached, output = token_counts(d)
        ideal = None if self.ideal is None else self.ideal.energy_j(
            d["flops"], d["kv_read_bytes"] + d["kv_write_bytes"], d["prefill_tokens"] + d["decode_tokens"])
        return RequestResult(
            id=self.ids[slot], energy_j=d["energy_j"], prefill_j=d["prefill_j"], decode_j=d["decode_j"],
            kv_j=d["kv_j"], compute_j=d["compute_j"], weights_j=d["weights_j"], static_j=d["static_j"],
            kv_read_bytes=d["kv_read_bytes"], kv_write_bytes=d["kv_write_bytes"],
            prompt_tokens=prompt, output_tokens=output, cached_prompt_tokens=cached, flops=d["flops"],
            stratum=self.stratum.get(slot),
            source=source, t_start=d["t_start"] if math.isfinite(d["t_start"]) else None,
            t_end=d["t_end"] if math.isfinite(d["t_end"]) else None, model=model, status=status, ideal_j=ideal,
        )


def token_counts(d: dict[str, float]) -> tuple[int, int, int]:
    """A request's prompt, cached-prompt and output tokens, from what the engine said and what its
    steps did. Prompt: the length the engine gave (cached tokens included), else the prefill work plus
    the cached tokens. Cached: the context of its first entry when that entry is prefill (the prefix
    cache's hit). Output: the count the engine gave, else its decode tokens plus the token sampled
    when its prefill completed (recomputed tokens after a preemption are prefill work, not output)."""
    prefill = int(d["prefill_tokens"])
    cached = max(int(d["cached_tokens"]), 0)
    prompt = int(d["prompt_tokens"]) or prefill + cached
    if d["given_output_tokens"] >= 0:
        output = int(d["given_output_tokens"])
    else:
        output = int(d["decode_tokens"]) + (1 if prefill > 0 and prefill + cached >= prompt else 0)
    return prompt, min(cached, prompt), output


def add_breakdowns(tot: Totals, cols: StepColumns, split: EntrySplit, table: RequestTable,
                   count: np.ndarray | None = None) -> None:
    """Add a run of settled entries to the totals: attributed/prefill/decode/KV joules, and the
    per-phase, per-stratum breakdowns. ``count`` marks entries whose tokens and bytes count now."""
    attributed = float(split.energy.sum())
    pre = float(split.energy[split.is_prefill].sum())
    tot.attributed_j += attributed
    tot.prefill_j += pre
    tot.decode_j += attributed - pre
    tot.kv_j += float(split.kv.sum())
    tot.compute_j += float(split.compute.sum())
    tot.weights_j += float(split.weights.sum())
    tot.static_j += float(split.static.sum())
    tot.kv_read_bytes += float((cols.kv_read if count is None else cols.kv_read[count]).sum())
    tot.kv_write_bytes += float((cols.kv_write if count is None else cols.kv_write[count]).sum())
    # per stratum: index requests by stratum, then bincount entries (vectorised)
    names = sorted({v or "" for v in table.stratum.values()} | {""})
    code = {n: i for i, n in enumerate(names)}
    req_code = np.zeros(max(len(table.ids), 1), dtype=np.int64)
    for k, v in table.stratum.items():
        req_code[k] = code[v or ""]
    ec = req_code[cols.req]
    m = len(names)
    kv = np.bincount(ec, split.kv, m)
    by = {ph: np.bincount(ec, np.where(mask, split.energy, 0.0), m)
          for ph, mask in (("prefill", split.is_prefill), ("decode", ~split.is_prefill))}
    tok = {ph: np.bincount(ec, (t if count is None else np.where(count, t, 0)).astype(float), m)
           for ph, t in (("prefill", cols.prefill), ("decode", cols.decode))}
    for i, name in enumerate(names):
        if kv[i]:
            tot.kv_j_by_stratum[name] = tot.kv_j_by_stratum.get(name, 0.0) + float(kv[i])
        for ph in ("prefill", "decode"):
            if by[ph][i]:
                d = tot.energy_j_by_phase_stratum.setdefault(ph, {})
                d[name] = d.get(name, 0.0) + float(by[ph][i])
            if tok[ph][i]:
                d = tot.tokens_by_phase_stratum.setdefault(ph, {})
                d[name] = d.get(name, 0.0) + float(tok[ph][i])


def note_metadata(table: RequestTable, reqs: Sequence[RequestEntry] | EntryArrays, slots: np.ndarray) -> None:
    """The request-metadata rule, for offline and online alike: a request's stratum and prompt length
    are the first ones any of its entries gives (the vLLM hook repeats them on every entry; files may
    give them once, anywhere); its cached prompt tokens are the context of its first entry when that is
    prefill; the engine's output count is the largest its entries give. ``reqs``: the entries, as records
    or as columns; ``slots``: the table slot of each entry, entries in time order.

    Per-request work: each request's first and last entries here are read; only requests still lacking
    a stratum or a prompt length are looked up in their other entries.
    """
    table.ensure(len(table.ids))
    n = len(slots)
    if not n:
        return
    # each request's first and last entry here (fancy assignment keeps the last write: write backwards
    # for the first); work in the entries' size and the table's, no sort
    pos = np.arange(n)
    first = np.full(int(slots.max()) + 1, n)
    first[slots[::-1]] = pos[::-1]
    uniq = np.flatnonzero(first < n)
    first_pos = first[uniq]
    last = np.zeros(len(first), dtype=np.int64)
    last[slots] = pos
    last_pos = last[uniq]
    get = reqs.metadata if isinstance(reqs, EntryArrays) else partial(entry_metadata, reqs)
    strata, prompts, _ = get(first_pos.tolist())
    outputs = get(last_pos.tolist())[2]
    if isinstance(reqs, EntryArrays):
        prefill, context = reqs.prefill[first_pos].tolist(), reqs.context[first_pos].tolist()
    else:
        prefill, context = ([getattr(reqs[i], f) for i in first_pos.tolist()] for f in ("prefill_tokens", "context_tokens"))
    prompt_col, cached_col, output_col = (table.col(c) for c in ("prompt_tokens", "cached_tokens",
                                                                  "given_output_tokens"))
    stratum = table.stratum
    missing = []
    for k, r_stratum, r_prompt, pre, ctx, given in zip(uniq.tolist(), strata, prompts, prefill, context, outputs):
        if stratum.get(k) is None and r_stratum is not None:
            stratum[k] = r_stratum
        if not prompt_col[k] and r_prompt:
            prompt_col[k] = r_prompt
        if cached_col[k] < 0:  # first sight of the request
            cached_col[k] = ctx if pre > 0 else 0
        if given is not None and given > output_col[k]:
            output_col[k] = given
        if stratum.get(k) is None or not prompt_col[k]:
            missing.append(k)
    if missing:
        idx = np.flatnonzero(np.isin(slots, missing))
        strata, prompts, _ = get(idx.tolist())
        for k, r_stratum, r_prompt in zip(slots[idx].tolist(), strata, prompts):
            if stratum.get(k) is None and r_stratum is not None:
                stratum[k] = r_stratum
            if not prompt_col[k] and r_prompt:
                prompt_col[k] = r_prompt
