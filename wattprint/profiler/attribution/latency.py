"""The energy counter's latency: the value published at time p covers the energy up to p - L.

A board's L is a few milliseconds and not published (the twin draws 0-4 ms). Unknown, it shifts every
counter change the same way, a bias that more prompts do not average out: at 0.2 requests/s the
prefill total missed 1 % on some traces (``bench/RESULTS.md`` §10). It is estimated per device from
the counter itself:

* only rows with no *falling* edge count: where a busy stretch ends, the device's power fades over tens
  of milliseconds (a fast tail no 100 ms counter resolves), which looks like latency (an estimate from
  every row ran ~1 ms late on the twin); where power rises there is no tail, only the shift;
* each candidate latency (a grid) moves the change points back; the coefficients are fitted anew to
  those rows (the idle decay time constant and which steps are capped held), and the candidates are
  compared by the residual of the rows where a busy stretch starts, refined by a parabola through the
  best three (a profile likelihood). On a busy trace the other rows would decide it by the model's
  small misfits within busy stretches (estimates of 5-6 ms for a 2-4 ms latency on the twin). Holding
  the coefficients instead, as the fit learned them with the latency applied, fed the estimate back
  into itself (a fixed point ~0.5 ms late on the twin).

Offline and online use this one rule: offline over the whole trace, before the fit proper; online with
one set of running sums per candidate (forgetting like the fit), from the blocks where power rises,
built again from those blocks when the running fit's idle decay time constant moves
(:mod:`~wattprint.profiler.attribution.risehistory`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wattprint.profiler.attribution.coefficients import COEF_NAMES, Coefficients
from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.attribution.features import FAR_PAST_S
from wattprint.profiler.attribution.fit import (
    FIT_LAG,
    NormalEquations,
    fit_rows,
    noise_j2,
    parabola_vertex,
    posterior,
    prior_mean,
    prior_precision,
    rss,
)

#: candidate latencies: 0 to 8 ms every 0.5 ms (the twin's 0-4 ms with room either way)
LATENCY_GRID_S = tuple(0.0005 * k for k in range(17))
#: a busy stretch ends where no step follows for this long
QUIET_GAP_S = 0.005
#: what an estimate needs before it is used (else the latency stays 0, as before it was estimated): this
#: many rising rows (three or four busy stretches starting) and at most this standard error
MIN_ROWS = 30
MAX_SIGMA_S = 0.001
#: a row counts as rising when a busy stretch starts inside it or this little before it
RISE_S = 0.02
#: a row whose start is this close after a stretch's end still holds the stretch's fast tail
TAIL_S = 0.1


def stretch_ends(t_start: np.ndarray, t_end: np.ndarray, known_until: float = np.inf,
                 quiet_s: float = QUIET_GAP_S) -> np.ndarray:
    """When each busy stretch ends: a step after which no step starts for ``quiet_s``. The steps are all
    those that started before ``known_until``, so the last one ends a stretch only if it ended that long
    before (online, a block's last step usually runs on into the next block)."""
    if len(t_end) == 0:
        return np.empty(0)
    return t_end[np.r_[t_start[1:] - t_end[:-1] >= quiet_s, known_until - t_end[-1] >= quiet_s]]


def stretch_starts(t_start: np.ndarray, t_end: np.ndarray, prev_end: float = -FAR_PAST_S,
                   quiet_s: float = QUIET_GAP_S) -> np.ndarray:
    """When each busy stretch starts: a step after ``quiet_s`` without steps (``prev_end``: when the step
    before the first one ended)."""
    if len(t_start) == 0:
        return np.empty(0)
    return t_start[np.r_[t_start[0] - prev_end >= quiet_s, t_start[1:] - t_end[:-1] >= quiet_s]]


def rows_without_falls(b_t: np.ndarray, ends: np.ndarray, lag: int = FIT_LAG) -> np.ndarray:
    """For each fit row (boundary k to k+lag): True when no busy stretch ends inside it, nor within
    ``TAIL_S`` before its start."""
    lag = max(1, min(lag, len(b_t) - 1))
    inside = np.searchsorted(ends, b_t[lag:], side="right") - np.searchsorted(ends, b_t[:-lag] - TAIL_S,
                                                                               side="right")
    return inside <= 0


def shifted(b_t: np.ndarray, latency_s: float, first_is_sample: bool) -> np.ndarray:
    """Change points moved back by the latency (a first sample is a read, not a publish: kept, or moved
    just before the first change if that now comes earlier)."""
    out = np.asarray(b_t, dtype=float) - latency_s
    if first_is_sample and len(out):
        out[0] = min(float(b_t[0]), float(out[1]) - 1e-6) if len(out) > 1 else float(b_t[0])
    return out


@dataclass
class Candidates:
    """Per candidate latency: the statistics of the rows without falling edges (the coefficients are
    fitted to them) and of those among them where power rises (the candidates are compared on them)."""

    fit: list[NormalEquations] = field(default_factory=lambda: [NormalEquations() for _ in LATENCY_GRID_S])
    rise: list[NormalEquations] = field(default_factory=lambda: [NormalEquations() for _ in LATENCY_GRID_S])

    @property
    def n_rise(self) -> float:
        return self.rise[0].n

    def add_from(self, other: Candidates, decay: float = 1.0) -> None:
        for mine, theirs in zip(self.fit + self.rise, other.fit + other.rise):
            mine.add_from(theirs, decay)

    def rss(self, prior: np.ndarray, lam: np.ndarray, noise2: float) -> np.ndarray:
        """Each candidate's residual on the rising rows, the coefficients fitted anew to its rows (a
        profile likelihood)."""
        return np.array([rss(r, posterior(f, prior, lam, noise2)) for f, r in zip(self.fit, self.rise)])


def rows_with_rises(b_t: np.ndarray, starts: np.ndarray, lag: int = FIT_LAG) -> np.ndarray:
    """For each fit row: True when a busy stretch starts inside it (or just before it)."""
    lag = max(1, min(lag, len(b_t) - 1))
    inside = np.searchsorted(starts, b_t[lag:], side="right") - np.searchsorted(starts, b_t[:-lag] - RISE_S,
                                                                                 side="right")
    return inside > 0


def latency_rows(cols: StepColumns, coef: Coefficients, b_t: np.ndarray, b_e: np.ndarray,
                 prev_end: float = -FAR_PAST_S, first_is_sample: bool = False,
                 new_after: float | None = None) -> Candidates:
    """The rows without falling edges, per candidate latency (``b_t``: the publish times as estimated,
    no latency applied; ``coef``: its idle decay time constant and which steps are capped are kept).
    ``new_after``: only the rows ending after it count (online: the rows new in a block)."""
    _, capped = coef.step_energy(cols)
    # the same rows for every candidate
    keep = rows_without_falls(b_t, stretch_ends(cols.t_start, cols.t_end, float(b_t[-1])))
    if new_after is not None:
        keep &= b_t[len(b_t) - len(keep):] > new_after
    rise = keep & rows_with_rises(b_t, stretch_starts(cols.t_start, cols.t_end, prev_end))
    out = Candidates()
    for i, lat in enumerate(LATENCY_GRID_S):
        bt = shifted(b_t, lat, first_is_sample)
        X, y = fit_rows(cols, coef, bt, b_e, float(bt[0]), prev_end, capped, first_is_sample=first_is_sample)
        out.fit[i].add(X[keep], y[keep])
        out.rise[i].add(X[rise], y[rise])
    return out


def vertex(rss: np.ndarray, n_rows: float = 0.0) -> tuple[float, float]:
    """The candidate with the least residual, refined by a parabola through it and its neighbours, and
    its standard error (inf where the residuals do not determine it): the parabola's curvature against
    the rows' noise (on the twin's 20-prompt traces it reads ~0.35 ms where the estimates scatter by
    ~0.45 ms around the true latency)."""
    k = int(np.argmin(rss))
    grid = np.asarray(LATENCY_GRID_S)
    lo = min(max(k - 1, 0), len(grid) - 3)  # at an end of the grid: the neighbours on its one side
    vertex = parabola_vertex(grid[lo: lo + 3], np.asarray(rss)[lo: lo + 3])
    if vertex is None:
        return float(grid[k]), float("inf")
    best, curv = float(np.clip(vertex[0], grid[0], grid[-1])), vertex[1]  # curv: d²rss/dL²
    dof = n_rows - (len(COEF_NAMES) + 1)
    if dof <= 0:
        return best, float("inf")
    noise2 = float(rss[k]) / dof  # per row
    return best, float(np.sqrt(2.0 * noise2 / curv))


def has_rises(cols: StepColumns, t0: float, t1: float, prev_end: float = -FAR_PAST_S) -> bool:
    """Whether a busy stretch starts inside [t0, t1] (the rows that inform the latency)."""
    starts = stretch_starts(cols.t_start, cols.t_end, prev_end)
    return bool(np.any((starts > t0) & (starts < t1)))


def estimate_latency_s(cols: StepColumns, coef: Coefficients, prior: Coefficients, b_t: np.ndarray,
                       b_e: np.ndarray, prev_end: float = -FAR_PAST_S, first_is_sample: bool = True) -> float:
    """The latency that best explains the rows where power rises (offline, over the whole trace), 0
    where they do not determine it (see :func:`usable`): ``coef`` gives the idle decay and the capped
    steps, ``prior`` the fit's prior."""
    if len(b_t) < 3:
        return 0.0
    rises = rows_with_rises(b_t, stretch_starts(cols.t_start, cols.t_end, prev_end))
    if rises.sum() < MIN_ROWS:  # too few to tell (a busy trace): not worth the candidates' rows
        return 0.0
    cands = latency_rows(cols, coef, b_t, b_e, prev_end, first_is_sample)
    best, sigma = vertex(cands.rss(prior_mean(prior), prior_precision(prior), noise_j2(prior)), cands.n_rise)
    return best if usable(cands.n_rise, sigma) else 0.0


def usable(n_rows: float, sigma_s: float) -> bool:
    """Whether an estimate from ``n_rows`` rows with standard error ``sigma_s`` is used."""
    return n_rows >= MIN_ROWS and sigma_s <= MAX_SIGMA_S
