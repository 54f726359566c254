"""One run reduced to a regression row: the energy between two republications of the counter and the
work done between them.

The counter's value changes about every 100 ms. A run's energy is taken between the first republication
after the rise time and the last before the run's end; the publish times and the stitching of counter
resets follow the counter rule of :func:`wattprint.profiler.timeline.counter.change_points` (a change's
publish time is the midpoint of the two polls around it). The work in that window follows from the
launch completion times, interpolated linearly, and the kernels' analytic counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wattprint.errors import MeterError
from wattprint.profiler.calibrate.plan import RunSpec
from wattprint.profiler.timeline.counter import change_points

NEAR_LIMIT_FRACTION = 0.97  # a run whose mean power reaches this share of the power limit is flagged


@dataclass
class RawRun:
    """What a device reports for one run: launch completions and the counter polls around them."""

    spec: RunSpec
    t_start_s: float
    done_t_s: np.ndarray  # times at which ...
    done_n: np.ndarray  # ... this many launches had completed (ascending)
    poll_t_s: np.ndarray
    poll_e_j: np.ndarray


@dataclass
class RunResult:
    """One run reduced to the regression's row: the counter window and the work done inside it."""

    spec: RunSpec
    launches: int
    energy_j: float
    duration_s: float
    flops: float
    dram_bytes: float
    kv_bytes: float
    near_power_limit: bool = False

    @property
    def mean_power_w(self) -> float:
        return self.energy_j / self.duration_s

    def row(self) -> dict:
        return {"duration_s": self.duration_s, "flops": self.flops, "dram_bytes": self.dram_bytes,
                "kv_bytes": self.kv_bytes}


def counter_window(poll_t_s, poll_e_j, t_lo_s: float, t_hi_s: float) -> tuple[float, float, float]:
    """``(t_a, t_b, joules)`` between the first republication at or after ``t_lo_s`` and the last at or
    before ``t_hi_s``. Raises :class:`MeterError` when the window holds fewer than two."""
    te, ee, _ = change_points(poll_t_s, poll_e_j, publish="midpoint")
    inside = np.flatnonzero((te >= t_lo_s) & (te <= t_hi_s))
    if len(inside) < 2:
        raise MeterError(
            f"the energy counter changed {len(inside)} time(s) in a {t_hi_s - t_lo_s:.3f} s window; "
            "runs must span several of its ~100 ms republications (raise --seconds)"
        )
    a, b = inside[0], inside[-1]
    return float(te[a]), float(te[b]), float(ee[b] - ee[a])


def analyse_run(raw: RawRun, rise_s: float, power_limit_w: float | None = None) -> RunResult:
    """Energy between counter republications after the rise time, and the work done in between
    (launch completions interpolated linearly)."""
    t_lo = raw.t_start_s + rise_s
    t_hi = float(raw.done_t_s[-1])
    t_a, t_b, energy = counter_window(raw.poll_t_s, raw.poll_e_j, t_lo, t_hi)
    xs = np.concatenate([[raw.t_start_s], raw.done_t_s])
    ns = np.concatenate([[0.0], raw.done_n.astype(float)])
    launches = float(np.interp(t_b, xs, ns) - np.interp(t_a, xs, ns))
    w = raw.spec.work
    duration = t_b - t_a
    near = bool(power_limit_w) and energy / duration >= NEAR_LIMIT_FRACTION * power_limit_w
    return RunResult(raw.spec, int(raw.done_n[-1]), energy, duration, launches * w.flops,
                     launches * w.dram_bytes, launches * w.kv_bytes, near)
