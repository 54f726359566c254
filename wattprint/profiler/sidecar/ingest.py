"""What the sidecar accepts from the wire: every record checked by the one rule of
:mod:`wattprint.profiler.core.validate` (as trace files are) before it can change any state, strata
normalised to the configured set, Hellos checked.

:func:`check_records` takes the records of one message and the last step the session accepted, and
returns the records to attribute (with their entries' token columns, extracted once for the check and
the attribution) and the rejected ones with the kind they are counted under
(``wattprint_dropped_records_total{reason}``). A rejected record never becomes "the previous step":
the order check of the next record is against the last accepted one.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter
from typing import NamedTuple

import numpy as np

from wattprint.profiler.core import validate as rule
from wattprint.profiler.core.strata import normalize
from wattprint.profiler.transport import messages as transport

_pre, _dec, _ctx = attrgetter("prefill_tokens"), attrgetter("decode_tokens"), attrgetter("context_tokens")
_prompt, _out, _id = attrgetter("prompt_tokens"), attrgetter("output_tokens"), attrgetter("id")
_reqs = attrgetter("requests")
_t0, _t1, _num = attrgetter("t_start"), attrgetter("t_end"), attrgetter("step")
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
    step), the new previous (step, t_end), and the prefill, decode and context tokens of the accepted
    records' entries (int64 columns, entries in order)."""

    accepted: list
    rejected: list
    prev: tuple[int, float] | None
    entries: tuple[np.ndarray, np.ndarray, np.ndarray] | None


def _record_problems(records: list, now_s: float, max_age_s: float, max_ahead_s: float) -> tuple:
    """Per record: None, or (kind, message) for the checks that do not depend on the previous step; and
    the token columns of the entries of the records that passed the size and time checks (``ok``)."""
    n = len(records)
    out: list = [None] * n
    lens = np.fromiter(map(len, map(_reqs, records)), np.int64, n)
    id_lens = np.fromiter(map(len, map(_id, chain.from_iterable(map(_reqs, records)))), np.int64, int(lens.sum()))
    starts = np.cumsum(lens) - lens
    longest = np.zeros(n, np.int64)
    has = lens > 0
    if has.any():
        longest[has] = np.maximum.reduceat(id_lens, starts[has])
    for i in np.flatnonzero((lens > rule.MAX_ENTRIES) | (longest > rule.MAX_ID_CHARS)).tolist():
        out[i] = ("invalid_size", rule.size_problem(int(lens[i]), int(longest[i])))
    t0 = np.fromiter(map(_t0, records), float, n)
    t1 = np.fromiter(map(_t1, records), float, n)
    num = np.array([float(min(x, 1 << 62)) for x in map(_num, records)])
    bad_t = rule.times_bad(t0, t1)
    far = rule.out_of_reach(t0, t1, now_s, max_age_s, max_ahead_s)
    bad_n = rule.numbers_bad(num)
    for i in np.flatnonzero(bad_t | far | bad_n):
        if out[i] is None:
            if bad_t[i]:
                out[i] = ("invalid_time", rule.explain_times(t0[i], t1[i]))
            elif far[i]:
                out[i] = ("invalid_time", f"step {records[i].step} is out of reach of now "
                                          f"(t_start {t0[i]:.3f}, t_end {t1[i]:.3f}, now {now_s:.3f})")
            else:
                out[i] = ("invalid_size", f"step number {records[i].step} out of range")
    ok = [i for i in range(n) if out[i] is None]
    if not ok:
        return out, None, ok, lens
    reqs = list(chain.from_iterable(records[i].requests for i in ok))
    m = len(reqs)
    try:
        cols = [np.fromiter(map(g, reqs), float, m) for g in (_pre, _dec, _ctx)]
    except OverflowError:  # an integer beyond float range: bad anyway
        cols = [np.fromiter((min(float(min(x, 1 << 60)), 2.0 ** 60) for x in map(g, reqs)), float, m)
                for g in (_pre, _dec, _ctx)]
    bad = rule.entries_bad(*cols)
    bad_opt = rule.optional_counts_bad(chain(map(_prompt, reqs), map(_out, reqs)))
    if bad.any() or bad_opt:
        offsets = np.cumsum([0] + [lens[i] for i in ok])
        for j in np.flatnonzero(bad):
            i = ok[int(np.searchsorted(offsets, j, side="right")) - 1]
            if out[i] is None:
                out[i] = ("invalid_tokens", rule.explain_entry(reqs[j].id, *(int(c[j]) for c in cols)))
        if bad_opt:
            for i in ok:
                r = records[i].requests
                if out[i] is None and rule.optional_counts_bad(chain(map(_prompt, r), map(_out, r))):
                    out[i] = ("invalid_tokens", "a prompt or output token count out of range")
    return out, cols, ok, lens


def check_records(records: list, prev: tuple[int, float] | None, now_s: float, *, max_age_s: float,
                  max_ahead_s: float) -> Checked:
    """Check the records of one message (see :class:`Checked`)."""
    if not records:
        return Checked([], [], prev, None)
    problems, cols, ok, lens = _record_problems(records, now_s, max_age_s, max_ahead_s)
    accepted, rejected, keep = [], [], np.zeros(len(records), dtype=bool)
    for i, (rec, problem) in enumerate(zip(records, problems)):
        if problem is None and prev is not None and rule.order_bad(prev[0], prev[1], rec.step, rec.t_start):
            problem = ("invalid_order", rule.explain_order(prev[0], prev[1], rec.step, rec.t_start))
        if problem is not None:
            rejected.append((problem[0], problem[1], rec.step))
            continue
        accepted.append(rec)
        keep[i] = True
        prev = (rec.step, rec.t_end)
    entries = None
    if cols is not None and accepted:
        mask = np.repeat(keep[ok], lens[ok])
        entries = tuple((c if mask.all() else c[mask]).astype(np.int64) for c in cols)
    return Checked(accepted, rejected, prev, entries)


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
