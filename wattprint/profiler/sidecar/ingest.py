"""What the sidecar accepts from the wire: every record checked by the one rule of
:mod:`wattprint.profiler.core.validate` (as trace files are) before it can change any state, strata
normalised to the configured set, Hellos checked.

:func:`check_records` takes the records of one message and the last step the session accepted, and
returns the records to attribute (with their entries' columns, extracted once for the check and the
attribution) and the rejected ones with the kind they are counted under
(``wattprint_dropped_records_total{reason}``). A rejected record never becomes "the previous step":
the order check of the next record is against the last accepted one. The checks run over the whole
message at once (one pass per column, numpy masks); they decide exactly as the rule applied to one
record after another (``tests/test_sidecar_ingest.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from wattprint.profiler.attribution.entries import Entries, EntryColumns
from wattprint.profiler.core import validate as rule
from wattprint.profiler.core.strata import normalize
from wattprint.profiler.transport import messages as transport

_MAX_CONFIG_KEYS = 4096
MAX_TP = 1024


class Strata:
    """Raw stratum -> configured stratum or ``unclassified`` (cached; the cache is bounded)."""

    def __init__(self, max_cached: int = 4096):
        self.max_cached = max_cached
        self.cache: dict[str, str] = {}  # raw -> normalised (and normalised -> itself)

    def __call__(self, raw) -> str:
        s = self.cache.get(raw) if isinstance(raw, str) else None
        if s is None:
            s = normalize(raw if isinstance(raw, str) and len(raw) <= rule.MAX_ID_CHARS else None)
            if isinstance(raw, str) and len(raw) <= rule.MAX_ID_CHARS:
                if len(self.cache) >= self.max_cached:
                    self.cache.clear()
                self.cache[raw] = s
        return s


class Checked(NamedTuple):
    """What :func:`check_records` found: the records to attribute, the rejected ones as (kind, message,
    step), the new previous (step, t_end), and the accepted records' entries' columns
    (:class:`~wattprint.profiler.attribution.pending.EntryColumns`: the prefill, decode and context int64
    columns, entries in order, with the entries' ids and other columns, extracted once)."""

    accepted: list
    rejected: list
    prev: tuple[int, float] | None
    entries: EntryColumns | None
    #: where records were rejected: ``k`` when some came just before ``accepted[k]`` (``len(accepted)``:
    #: after the last one)
    rejected_before: tuple[int, ...] = ()


def _int_columns(reqs: list) -> list[np.ndarray]:
    """Prefill, decode and context tokens of ``reqs`` as int64 columns (a count beyond int64 clamped:
    still out of range, so the entry is refused)."""
    n = len(reqs)
    lists = ([r.prefill_tokens for r in reqs], [r.decode_tokens for r in reqs], [r.context_tokens for r in reqs])
    try:
        return [np.fromiter(c, np.int64, n) for c in lists]
    except OverflowError:
        return [np.fromiter(map(rule.clamp, c), np.int64, n) for c in lists]


def _optional_bad(reqs: list, entries: Entries) -> np.ndarray:
    """Per entry: a prompt or output token count given and out of range (the rule of
    :func:`~wattprint.profiler.core.validate.optional_counts_bad`)."""
    bad = np.zeros(len(reqs), dtype=bool)
    prompt = [r.prompt_tokens for r in reqs]
    try:  # every entry gives its prompt length (the hook's records): one look at the extremes
        suspect = prompt and (min(prompt) < 0 or max(prompt) > rule.MAX_TOKENS)
    except TypeError:  # some give none
        suspect = rule.optional_counts_bad(prompt)
    if suspect:
        bad |= np.fromiter((x is not None and rule.optional_counts_bad((x,)) for x in prompt), bool, len(prompt))
    if rule.optional_counts_bad(entries.output):
        for i, x in zip(entries.given, entries.output):
            bad[i] |= rule.optional_counts_bad((x,))
    return bad


def _record_problems(records: list, now_s: float, max_age_s: float, max_ahead_s: float) -> tuple:
    """Per record: None, or (kind, message) for the checks that do not depend on the previous step; the
    entries' columns (every record's, extracted once); each record's entry count; and the records'
    times and (clamped) numbers."""
    n = len(records)
    out: list = [None] * n
    lens = np.array([len(r.requests) for r in records], np.int64).reshape(n)
    reqs = [e for r in records for e in r.requests]
    ids = [e.id for e in reqs]
    if len(reqs) and (lens.max() > rule.MAX_ENTRIES or max(map(len, ids)) > rule.MAX_ID_CHARS):
        offsets = np.cumsum(lens) - lens
        for i in range(n):
            longest = max(map(len, ids[offsets[i]:offsets[i] + lens[i]]), default=0)
            problem = rule.size_problem(int(lens[i]), longest)
            if problem is not None:
                out[i] = ("invalid_size", problem)
    t0 = np.array([r.t_start for r in records], float).reshape(n)
    t1 = np.array([r.t_end for r in records], float).reshape(n)
    num = np.array([float(rule.clamp(r.step)) for r in records], float).reshape(n)
    bad_t = rule.times_bad(t0, t1)
    far = rule.out_of_reach(t0, t1, now_s, max_age_s, max_ahead_s)
    bad_n = rule.numbers_bad(num)
    for i in np.flatnonzero(bad_t | far | bad_n).tolist():
        if out[i] is None:
            if bad_t[i]:
                out[i] = ("invalid_time", rule.explain_times(t0[i], t1[i]))
            elif far[i]:
                out[i] = ("invalid_time", f"step {records[i].step} is out of reach of now "
                                          f"(t_start {t0[i]:.3f}, t_end {t1[i]:.3f}, now {now_s:.3f})")
            else:
                out[i] = ("invalid_size", f"step number {records[i].step} out of range")
    cols = _int_columns(reqs)
    entries = Entries.of(reqs, ids)
    bad = rule.entries_bad(*cols)
    bad_opt = _optional_bad(reqs, entries)
    if bad.any() or bad_opt.any():
        rec_of = np.repeat(np.arange(n), lens)
        for j in np.flatnonzero(bad).tolist():
            if out[rec_of[j]] is None:
                out[rec_of[j]] = ("invalid_tokens", rule.explain_entry(ids[j], *(int(c[j]) for c in cols)))
        for j in np.flatnonzero(bad_opt).tolist():
            if out[rec_of[j]] is None:
                out[rec_of[j]] = ("invalid_tokens", "a prompt or output token count out of range")
    return out, EntryColumns(*cols, entries, lens), t0, t1, num


def check_records(records: list, prev: tuple[int, float] | None, now_s: float, *, max_age_s: float,
                  max_ahead_s: float) -> Checked:
    """Check the records of one message (see :class:`Checked`)."""
    if not records:
        return Checked([], [], prev, None)
    problems, cols, t0, t1, num = _record_problems(records, now_s, max_age_s, max_ahead_s)
    ok = [i for i, p in enumerate(problems) if p is None]
    if ok and prev is not None or len(ok) > 1:  # the order check, at once for the message
        pn = np.array(([prev[0]] if prev is not None else []) + num[ok].tolist(), float)
        pt = np.array(([prev[1]] if prev is not None else []) + t1[ok].tolist(), float)
        k = 1 if prev is None else 0  # the first record has no predecessor
        bad = np.zeros(len(ok), dtype=bool)
        bad[k:] = rule.order_bad(pn[:len(pn) - 1], pt[:len(pt) - 1], num[ok][k:], t0[ok][k:])
        if bad.any():  # from the first bad one on, the previous step is the last accepted: one by one
            first = int(np.argmax(bad))
            last = ok[first - 1] if first else None
            p = prev if last is None else (records[last].step, records[last].t_end)
            for i in ok[first:]:
                rec = records[i]
                if rule.order_bad(p[0], p[1], rec.step, rec.t_start):
                    problems[i] = ("invalid_order", rule.explain_order(p[0], p[1], rec.step, rec.t_start))
                else:
                    p = (rec.step, rec.t_end)
    accepted, rejected, before = [], [], []
    for rec, problem in zip(records, problems):
        if problem is None:
            if before and before[-1] < 0:
                before[-1] = len(accepted)
            accepted.append(rec)
            prev = (rec.step, rec.t_end)
        else:
            rejected.append((problem[0], problem[1], rec.step))
            if not before or before[-1] >= 0:
                before.append(-1)  # before the next accepted one
    if before and before[-1] < 0:
        before[-1] = len(accepted)
    if not accepted:
        return Checked(accepted, rejected, prev, None, tuple(before))
    if rejected:
        cols = cols.select([i for i, p in enumerate(problems) if p is None])
    return Checked(accepted, rejected, prev, cols, tuple(before))


def loss_points(checked: Checked, prev: tuple[int, float] | None, gap: bool) -> list[int]:
    """Where the session lost records, as positions ``k`` (before ``checked.accepted[k]``; ``k ==
    len(accepted)``: after the last one), increasing: rejected records, records lost before the batch
    (``gap``), and step numbers that skip (records lost on the way)."""
    losses = set(checked.rejected_before)
    if gap:
        losses.add(0)
    last = prev[0] if prev is not None else None
    for k, rec in enumerate(checked.accepted):
        if last is not None and rec.step != last + 1:
            losses.add(k)
        last = rec.step
    return sorted(losses)


def runs_between(n: int, losses: list[int]) -> list[tuple[int, int, bool]]:
    """The runs ``[a, b)`` of ``n`` accepted records between the ``losses`` (:func:`loss_points`), each
    with whether records were lost just before it (and an empty last run when lost after the last one)."""
    cuts = [0, *(k for k in losses if 0 < k < n), n]
    out = [(a, b, a in losses) for a, b in zip(cuts, cuts[1:])]
    return out + [(n, n, True)] if n and n in losses else out


def first_sightings(reqs: list, known) -> list:
    """The first entry of each request id of ``reqs`` not in ``known``, in order of appearance."""
    ids = reqs.ids if isinstance(reqs, Entries) else [r.id for r in reqs]
    fresh = [rid for rid in dict.fromkeys(ids) if rid not in known]
    if len(fresh) <= 8:
        return [reqs[ids.index(rid)] for rid in fresh]
    first = dict(zip(reversed(ids), range(len(ids) - 1, -1, -1)))
    return [reqs[first[rid]] for rid in fresh]


def hello_problem(hello: transport.Hello, n_devices: int) -> str | None:
    """Why a Hello cannot be used (None when it can)."""
    if not (0 <= hello.pid < (1 << 31)):
        return f"pid {hello.pid} out of range"
    for name in ("model", "engine", "engine_version"):
        if len(getattr(hello, name)) > rule.MAX_ID_CHARS:
            return f"{name} longer than {rule.MAX_ID_CHARS} characters"
    if len(hello.session) > transport.MAX_SESSION_CHARS:
        return f"session token longer than {transport.MAX_SESSION_CHARS} characters"
    if len(hello.model_config) > _MAX_CONFIG_KEYS:
        return "model_config has too many keys"
    if not (1 <= hello.tensor_parallel_size <= MAX_TP):
        return f"tensor_parallel_size {hello.tensor_parallel_size} out of range"
    if hello.kv_block_size is not None and not (1 <= hello.kv_block_size <= rule.MAX_TOKENS):
        return f"kv_block_size {hello.kv_block_size} out of range"
    if hello.devices is not None:
        d = hello.devices
        if not d or len(set(d)) != len(d) or min(d) < 0 or max(d) >= max(n_devices, 1):
            return f"devices {d[:16]} are not distinct indices of the meter's {n_devices} devices"
    return None
