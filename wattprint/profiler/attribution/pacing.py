"""When the online driver fits and settles: the fit's lead over settlement and its warm-up, the lead's
bound under memory pressure, the hold of a block whose compute-bound steps the fit does not know yet,
the blocks fitted again when the counter's latency moves, where a block's fit rows begin and where the
last block ends at shutdown. Pure functions of the driver's state (used by :mod:`online`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from wattprint.profiler.attribution.columns import StepColumns
    from wattprint.profiler.attribution.devices import OnlineDevice

#: the fit's default lead over settlement, in windows (60 s): a block is settled with coefficients that
#: have seen the counter this long past its end (a GPU at its power cap teaches the fit only in the lulls
#: between bursts; at 0.2 requests/s a minute holds a dozen prompts: with a 30 s lead the online prefill
#: total scattered by 0.58 % rms over 20 traces, with 60 s by 0.43 %)
LOOKAHEAD_WINDOWS = 30
#: memory first: while the unsettled steps hold more request entries than this (~16 bytes each), the lead
#: shrinks to MIN_LEAD_WINDOWS (at 2,000 steps/s × 64 requests the full lead would hold ~4 M entries)
MAX_LEAD_ENTRIES = 1_500_000
MIN_LEAD_WINDOWS = 5
#: a compute-bound step (its FLOPs' predicted energy at least this share of the step's) is settled once
#: the running fit knows its energy per FLOP, at its utilisation, within HOLD_REL_SIGMA (1 sigma) - or
#: at most MAX_HOLD_WINDOWS windows (300 s) later than the lead. The profile states one energy per FLOP
#: and no utilisation slope; a trace that opens with a long prompt among short ones held it at the
#: prior's slope and priced that prefill 12 % low (H100 twin seed 65 at 0.2 requests/s: prefill total
#: 1.9 % off online, 0.3 % offline); a later long prompt determines it
COMPUTE_BOUND_SHARE = 0.5
HOLD_REL_SIGMA = 0.15
MAX_HOLD_WINDOWS = 150
#: while a block is held, it is looked at again once the fit has moved this many windows on (deciding
#: derives the block's columns: at 2,000 steps/s × 64 requests ~30 ms a time)
RECHECK_WINDOWS = 5


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


def undetermined(flop_j: np.ndarray, step_j: np.ndarray, capped: np.ndarray, rel_sigma: np.ndarray) -> bool:
    """Whether a block holds a compute-bound step, not at the power cap, whose energy per FLOP the running
    fit does not know yet (see ``HOLD_REL_SIGMA``): its settlement waits (at most ``MAX_HOLD_WINDOWS``)."""
    bound = (flop_j >= COMPUTE_BOUND_SHARE * step_j) & (flop_j > 0) & ~capped
    return bool(np.any(bound & (rel_sigma > HOLD_REL_SIGMA)))


class SettleHold:
    """The online driver's hold of a block whose compute-bound steps the running fit does not know yet
    (:func:`undetermined`); the decision is kept until the fit has moved ``RECHECK_WINDOWS`` on."""

    def __init__(self) -> None:
        self._end: float | None = None  # the block of the last decision
        self._fitted_until = -math.inf  # how far the fit had seen then
        self._held = False

    @staticmethod
    def may(end: float, fitted_until: float, pending_entries: int, lookahead_s: float, window_s: float) -> bool:
        """Whether the block ending at ``end`` may wait: not while the unsettled entries exceed
        ``MAX_LEAD_ENTRIES`` (memory first), nor once the fit has seen ``MAX_HOLD_WINDOWS`` past the lead."""
        return (pending_entries <= MAX_LEAD_ENTRIES
                and fitted_until < end + lookahead_s + MAX_HOLD_WINDOWS * window_s)

    def still(self, end: float, fitted_until: float, window_s: float) -> bool:
        """Held, and the fit has not moved ``RECHECK_WINDOWS`` on since that was decided."""
        return (self._held and self._end == end
                and fitted_until < self._fitted_until + RECHECK_WINDOWS * window_s)

    def decide(self, end: float, fitted_until: float, devices: Sequence[OnlineDevice], cols: StepColumns) -> bool:
        """Whether the block (its steps ``cols``) waits: on any device, a compute-bound step's energy per
        FLOP is not known yet."""
        self._end, self._fitted_until = end, fitted_until
        self._held = any(undetermined(dev.coef.flop_energy_j(cols) * cols.step_flops, *dev.coef.step_energy(cols),
                                      dev.flop_rel_sigma(cols)) for dev in devices)
        return self._held


def fit_lead_s(lookahead_s: float, window_s: float, pending_entries: int) -> float:
    """How far the fit must have seen past a block before it is settled: ``lookahead_s``, or at most
    ``MIN_LEAD_WINDOWS`` windows while the unsettled entries exceed ``MAX_LEAD_ENTRIES``."""
    if pending_entries > MAX_LEAD_ENTRIES:
        return min(lookahead_s, MIN_LEAD_WINDOWS * window_s)
    return lookahead_s


def shutdown_end(devices: Sequence[OnlineDevice], start: float, end: float | None) -> float | None:
    """At shutdown a block may be shorter: it ends at device 0's last change that every device's counter
    covers (``end``, the window rule's end, if that is covered)."""
    if not all(d.b_t for d in devices):
        return end
    covered = min(d.b_t[-1] for d in devices)
    if end is not None and end <= covered:
        return end
    return next((b for b in reversed(devices[0].b_t) if start < b <= covered), None)


def fit_origins(devices: Sequence[OnlineDevice], start: float, settled_until: float | None,
                first_block: bool) -> list[float]:
    """Where each device's fit rows for the block from ``start`` begin: they reach back into the
    previous block (its steps are still held: settlement lags the fit), see :meth:`OnlineDevice.fit_origin`."""
    if first_block:
        return [start for _ in devices]
    held = -math.inf if settled_until is None else settled_until
    return [dev.fit_origin(start, held) for dev in devices]
