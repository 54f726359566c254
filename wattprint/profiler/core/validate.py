"""The rule every step record must satisfy, written once: the offline validator of trace files
(:func:`wattprint.profiler.core.records.validate_steps`) and the sidecar's online check of each record
from the wire (:mod:`wattprint.profiler.sidecar.ingest`) both call these pure functions.

Every function takes numpy arrays (a whole trace, or the records of one message) or plain scalars, and
returns a boolean mask (``True``: bad) or a reason. Counts and step numbers are compared as float64
(exact below 2**53, and anything larger is out of range anyway), so no value from the wire overflows. Each reason has a *kind*, the label value it is
counted under in ``wattprint_dropped_records_total{reason}``:

* ``invalid_time`` - a time that is not finite, a step that ends before it starts or lasts longer than
  :data:`MAX_STEP_S`, or (online only, :func:`out_of_reach`) a time out of reach of now;
* ``invalid_order`` - a step number not above the previous step's, a step that starts before the
  previous one ended, or a step number that jumps further ahead than the elapsed time allows
  (:data:`MAX_STEPS_PER_S`): one bad number must not make every later step look out of order;
* ``invalid_tokens`` - a token count below 0 or above :data:`MAX_TOKENS`, or an entry scheduling no
  token at all (``prefill_tokens + decode_tokens == 0``);
* ``invalid_size`` - more than :data:`MAX_ENTRIES` entries in a step, a request id longer than
  :data:`MAX_ID_CHARS`, a step number outside ``[0, MAX_STEP]``.
"""

from __future__ import annotations

from functools import partial
from operator import is_not

import numpy as np

#: tokens of one request in one step, prompt and output lengths, contexts (2**24: 16.7 M)
MAX_TOKENS = 1 << 24
#: requests in one step
MAX_ENTRIES = 1 << 16
#: characters of a request id (or model name, stratum) from outside
MAX_ID_CHARS = 256
#: the largest step number (at 10 000 steps/s: 3.5 years)
MAX_STEP = 1 << 40
#: the longest step, seconds
MAX_STEP_S = 3600.0
#: step numbers may advance at most this fast with time (hook drops make them skip), plus a slack
MAX_STEPS_PER_S = 10_000.0
STEP_JUMP_SLACK = 256
#: a step may start this much before the previous one ended (clock rounding)
OVERLAP_S = 1e-6

KINDS = ("invalid_time", "invalid_order", "invalid_tokens", "invalid_size")
_given = partial(is_not, None)


def clamp(x: int) -> int:
    """An integer from outside brought into int64 (JSON and msgpack ints are unbounded); a value this far
    out stays out of every range above, so the rule still refuses it."""
    return min(max(x, -(1 << 62)), 1 << 62)


def times_bad(t0, t1):
    """Steps whose times are not finite, that end before they start, or last over MAX_STEP_S."""
    t0 = np.asarray(t0, dtype=float)
    t1 = np.asarray(t1, dtype=float)
    with np.errstate(invalid="ignore"):
        return ~(np.isfinite(t0) & np.isfinite(t1)) | ~(t1 >= t0) | (t1 - t0 > MAX_STEP_S)


def explain_times(t0: float, t1: float) -> str:
    if not (np.isfinite(t0) and np.isfinite(t1)):
        return "t_start and t_end must be finite numbers"
    if t1 < t0:
        return f"t_end {t1} is before t_start {t0}"
    return f"step lasts {t1 - t0:.0f} s, over the {MAX_STEP_S:.0f} s limit"


def order_bad(num_prev, t1_prev, num, t0):
    """Steps (``num``, starting at ``t0``) out of order after their predecessors (``num_prev`` ending at
    ``t1_prev``): a step number not above the previous, a start before the previous end, or a number
    further ahead than :data:`MAX_STEPS_PER_S` allows for the time between them."""
    num_prev, num = np.asarray(num_prev, dtype=float), np.asarray(num, dtype=float)  # exact below 2**53
    dt = np.maximum(np.asarray(t0, dtype=float) - np.asarray(t1_prev, dtype=float), 0.0)
    jump = num - num_prev > MAX_STEPS_PER_S * dt + STEP_JUMP_SLACK
    return (num <= num_prev) | (np.asarray(t0, dtype=float) < np.asarray(t1_prev, dtype=float) - OVERLAP_S) | jump


def explain_order(num_prev: int, t1_prev: float, num: int, t0: float) -> str:
    if num <= num_prev:
        return f"steps out of order: step {num} after step {num_prev}"
    if t0 < t1_prev - OVERLAP_S:
        return f"steps out of order: t_start {t0} is before the previous step's t_end {t1_prev}"
    return f"step number {num} jumps too far ahead of step {num_prev} for the time between them"


def numbers_bad(num):
    """Step numbers outside ``[0, MAX_STEP]``."""
    num = np.asarray(num, dtype=float)
    return (num < 0) | (num > MAX_STEP)


def entries_bad(prefill, decode, context):
    """Entries with a token count below 0 or above MAX_TOKENS, or scheduling no token."""
    p, d, c = (x if isinstance(x, np.ndarray) and x.dtype.kind == "i" else np.asarray(x, dtype=float)
               for x in (prefill, decode, context))  # integer columns compared as they are (exact)
    bad = (p < 0) | (d < 0) | (c < 0) | (p > MAX_TOKENS) | (d > MAX_TOKENS) | (c > MAX_TOKENS)
    bad |= p + d == 0  # an integer sum that overflows has an addend out of range: already bad
    return bad


def explain_entry(rid: str, prefill: int, decode: int, context: int) -> str:
    if min(prefill, decode, context) < 0:
        return f"request {rid!r} has a negative token count"
    if prefill + decode == 0:
        return f"request {rid!r} is scheduled with no tokens"
    return f"request {rid!r} has a token count over {MAX_TOKENS}"


def optional_counts_bad(values) -> bool:
    """Optional per-entry counts (``prompt_tokens``, ``output_tokens``; None = not given) out of
    ``[0, MAX_TOKENS]``."""
    given = list(filter(_given, values))
    return bool(given) and (min(given) < 0 or max(given) > MAX_TOKENS)


def size_problem(n_entries: int, longest_id: int) -> str | None:
    """A step too large to be real: too many entries or too long a request id (kind ``invalid_size``)."""
    if n_entries > MAX_ENTRIES:
        return f"{n_entries} requests in one step, over the {MAX_ENTRIES} limit"
    if longest_id > MAX_ID_CHARS:
        return f"a request id of {longest_id} characters, over the {MAX_ID_CHARS} limit"
    return None


def out_of_reach(t0, t1, now_s: float, max_age_s: float, max_ahead_s: float):
    """Online only: steps that started more than ``max_age_s`` before ``now_s`` or end more than
    ``max_ahead_s`` after it (both processes read one ``time.monotonic()`` clock)."""
    t0 = np.asarray(t0, dtype=float)
    t1 = np.asarray(t1, dtype=float)
    with np.errstate(invalid="ignore"):
        return ~(t0 >= now_s - max_age_s) | ~(t1 <= now_s + max_ahead_s)
