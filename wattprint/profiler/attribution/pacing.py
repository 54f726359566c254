"""When the online driver fits and settles: the fit's lead over settlement and its warm-up, the lead's
bound under memory pressure, and the blocks fitted again when the counter's latency moves. Pure
functions of the driver's state (used by :mod:`online`)."""

from __future__ import annotations

#: the fit's default lead over settlement, in windows (60 s): a block is settled with coefficients that
#: have seen the counter this long past its end (a GPU at its power cap teaches the fit only in the lulls
#: between bursts; at 0.2 requests/s a minute holds a dozen prompts: with a 30 s lead the online prefill
#: total scattered by 0.58 % rms over 20 traces, with 60 s by 0.43 %)
LOOKAHEAD_WINDOWS = 30
#: memory first: while the unsettled steps hold more request entries than this (~16 bytes each), the lead
#: shrinks to MIN_LEAD_WINDOWS (at 2,000 steps/s × 64 requests the full lead would hold ~4 M entries)
MAX_LEAD_ENTRIES = 1_500_000
MIN_LEAD_WINDOWS = 5


def fit_timing(window_s: float, lookahead_s: float | None, warmup_s: float | None,
               fitting: bool) -> tuple[float, float]:
    """(lead, warm-up) of the running fit: it runs ahead of settlement (default: LOOKAHEAD_WINDOWS), so
    early blocks are not split by an unformed fit; final records come that much later (provisional ones
    at once); and nothing is settled before the fit has seen the warm-up's length of the counter
    (default: ten windows, 20 s). Both 0 with fixed coefficients."""
    if not fitting:
        return 0.0, 0.0
    return (LOOKAHEAD_WINDOWS * window_s if lookahead_s is None else lookahead_s,
            10.0 * window_s if warmup_s is None else warmup_s)


def refit_blocks(b_t: list[float], start: float, end: float, window_s: float) -> list[tuple[float, float]]:
    """The blocks from ``start`` to ``end`` (as the fit formed them: ending at changes of the counter at
    least ``window_s`` apart), to fit again."""
    out, t = [], start
    while t < end:
        e = min(next((b for b in b_t if b >= t + window_s), end), end)
        out.append((t, e))
        t = e
    return out


def fit_lead_s(lookahead_s: float, window_s: float, pending_entries: int) -> float:
    """How far the fit must have seen past a block before it is settled: ``lookahead_s``, or at most
    ``MIN_LEAD_WINDOWS`` windows while the unsettled entries exceed ``MAX_LEAD_ENTRIES``."""
    if pending_entries > MAX_LEAD_ENTRIES:
        return min(lookahead_s, MIN_LEAD_WINDOWS * window_s)
    return lookahead_s
