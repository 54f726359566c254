"""One device's state in the online driver: counter change points, running fit."""

from __future__ import annotations

import numpy as np

from wattprint.profiler.attribution.coefficients import COEF_NAMES, PROFILE_ONLY_NAMES, Coefficients
from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.attribution.fit import (
    FIT_LAG,
    ONLINE_TAU_GRID_S,
    NormalEquations,
    fit_report,
    fit_rows,
    flop_energy_rel_sigma,
    noise_j2,
    parabola_vertex,
    posterior,
    prior_mean,
    prior_precision,
    rss,
)
from wattprint.profiler.attribution.latency import has_rises, usable, vertex
from wattprint.profiler.attribution.risehistory import RiseBlock, RiseHistory
from wattprint.profiler.timeline.counter import CounterTrack

#: the running fit is built again (from the blocks not yet settled) when the latency has moved by more
#: than this since its rows were built: rows from before the latency was known carried its bias (on the
#: twin at 0.2 requests/s, boards with a 3-4 ms latency missed the prefill total by 1-2.5 % online)
REFIT_LATENCY_S = 0.0005
#: changes this long after the last settled instant or more take a new latency estimate; those nearer
#: stay, as they bound the energy the next block starts from (changes come every ~0.1 s)
RESHIFT_GUARD_S = 0.5


class OnlineDevice:
    """One device's counter change points (the timeline's counter rule), running fit (online)."""

    def __init__(self, coef: Coefficients, publish: str = "midpoint", fit: bool = True):
        self.coef = coef
        self.fit = fit
        self.track = CounterTrack(publish)
        self.b_t: list[float] = []  # times the counter's changes cover (publish time - latency)
        self.b_e: list[float] = []  # stitched cumulative joules there
        self.b_raw: list[float] = []  # their estimated publish times (no latency)
        #: the counter's latency (see :mod:`latency`), applied to each change as it arrives
        self.latency_s = 0.0
        self._fit_latency_s = 0.0  # the latency the running fit's rows were built with
        self._rises = RiseHistory()  # the latency's running sums (see :mod:`risehistory`)
        self.prev_tail_w = 0.0  # the fast tail power of the last step settled (its gap's start)
        self._prior = prior_mean(coef)
        self._prior_coef = coef.with_theta(self._prior)
        self._first_block = True
        self._lam = prior_precision(coef)
        self._noise2 = noise_j2(coef)
        #: one set of sufficient statistics per idle-decay time constant: tau is fitted online too
        self._ne = {tau: NormalEquations() for tau in ONLINE_TAU_GRID_S}
        self._best_ne: NormalEquations | None = None  # the statistics at the fitted time constant
        self.report: dict = {"fitted": [], "from_profile": [*COEF_NAMES, *PROFILE_ONLY_NAMES],
                             "counter_latency_s": 0.0}

    @property
    def resets(self) -> int:
        return self.track.resets

    def observe(self, t: float, raw_e: float) -> None:
        first = self.track.value_j is None
        cp = self.track.feed(t, raw_e)
        if first:  # the first sample bounds the energy up to its time (the edge rule, as offline)
            self.b_t.append(t)
            self.b_e.append(raw_e)
            self.b_raw.append(t)
        elif cp is not None:  # each change keeps the latency known when it arrived (a boundary never moves)
            self.b_t.append(max(cp.t_pub_s - self.latency_s, self.b_t[-1] + 1e-6))
            self.b_e.append(cp.energy_j)
            self.b_raw.append(cp.t_pub_s)

    def energy_at(self, t: float) -> float:
        """Cumulative energy at ``t``, interpolated between change points."""
        return float(np.interp(t, self.b_t, self.b_e))

    def boundaries_between(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        bt = np.asarray(self.b_t)
        m = (bt > t0) & (bt < t1)
        return (np.concatenate([[t0], bt[m], [t1]]),
                np.concatenate([[self.energy_at(t0)], np.asarray(self.b_e)[m], [self.energy_at(t1)]]))

    def forget_before(self, t: float) -> None:
        """Drop change points no longer needed (keep the last one at or before ``t``)."""
        i = int(np.searchsorted(self.b_t, t, side="right")) - 1
        if i > 0:
            del self.b_t[:i]
            del self.b_e[:i]
            del self.b_raw[:i]

    def fit_origin(self, start: float, not_before: float) -> float:
        """Where a block's fit rows begin: ``FIT_LAG`` change points before the block's ``start`` (but not
        before ``not_before``), so that its rows continue the previous block's (see :meth:`update_fit`)."""
        i = int(np.searchsorted(self.b_t, start, side="left"))
        j = int(np.searchsorted(self.b_t, not_before, side="left"))
        return float(self.b_t[max(i - FIT_LAG, j, 0)]) if i > 0 else start

    def update_fit(self, cols: StepColumns, b_t: np.ndarray, b_e: np.ndarray, origin: float,
                   prev_end: float, half_life_s: float, new_after: float | None = None,
                   settled_until: float | None = None, refit: bool = False) -> None:
        """Add a block's counter intervals to the running fit (forgetting with ``half_life_s``) and
        re-solve for every grid time constant; keep the one with the least residual.

        ``b_t`` may begin before the block (at :meth:`fit_origin`): only the rows that end after
        ``new_after`` (the block's start) are new, so every counter interval enters as many rows as
        offline, not only those away from block edges (a prefill at the start of a block would count
        a tenth as much as offline).

        ``settled_until``: the last settled instant; changes well after it take the latency as now
        estimated (see :meth:`_reshift`). ``refit``: the block is fitted again after
        :meth:`restart_fit` (the latency's sums and the changes are left as they are)."""
        if not self.fit or len(b_t) < 3:
            return
        first = self._first_block
        # which steps are at the power cap is the profile's call, not the running fit's: a capped step enters
        # its rows only by its duration (the cap power's column, which learns the board's gain on the cap).
        # Letting the running fit decide (as offline, which iterates over the whole trace) fed its early
        # errors back into the rows it learned from - one that undershot took capped steps for uncapped
        # ones and learned its own error, one that overshot dropped the rows that could correct it
        capped = self._prior_coef.step_energy(cols)[1]
        keep = np.ones(len(b_t) - max(1, min(FIT_LAG, len(b_t) - 1)), dtype=bool)
        if new_after is not None:  # only the rows that end inside this block are new
            keep &= b_t[len(b_t) - len(keep):] > new_after
        decay = 0.5 ** ((b_t[-1] - b_t[0]) / half_life_s)
        for tau, ne in self._ne.items():
            X, y = fit_rows(cols, self.coef.with_theta(self.coef.theta, tau), b_t, b_e, origin, prev_end,
                            capped, first_is_sample=self._first_block)
            ne.add(X[keep], y[keep], decay)
        self._first_block = False  # its first boundary was the first sample, not a change (see fit_rows)
        if next(iter(self._ne.values())).n < 20:
            return
        taus = list(self._ne)
        thetas = [posterior(ne, self._prior, self._lam, self._noise2) for ne in self._ne.values()]
        resid = np.array([rss(ne, th) for ne, th in zip(self._ne.values(), thetas)])
        k = int(np.argmin(resid))
        tau, theta = between_grid_points(taus, thetas, resid, k)
        self.coef = self.coef.with_theta(theta, tau)
        ne = self._best_ne = self._ne[taus[k]]
        if not refit:
            self._update_latency(cols, b_t, b_e, prev_end, decay, first, new_after)
            self._reshift(-np.inf if settled_until is None else settled_until + RESHIFT_GUARD_S)
        self.report = {**fit_report(ne, self._lam), "counter_latency_s": self.latency_s}

    def _update_latency(self, cols: StepColumns, b_t: np.ndarray, b_e: np.ndarray, prev_end: float,
                        decay: float, first: bool, new_after: float | None) -> None:
        """Add this block's rows to the latency's running sums when they inform it (see
        :meth:`RiseHistory.wants`); move the latency to the best candidate (see :mod:`latency`)."""
        rises = has_rises(cols, float(b_t[0]), float(b_t[-1]), prev_end)
        if not self._rises.wants(len(cols.t_start), rises, float(b_t[-1])):
            return
        raw = np.interp(b_t, self.b_t, self.b_raw)  # the boundaries' publish times
        after = None if new_after is None else float(np.interp(new_after, self.b_t, self.b_raw))
        # kept without entries (the rows need none), in copies of their own: ~40 bytes a step
        steps = StepColumns.steps_only(*(np.array(x) for x in (cols.t_start, cols.t_end, cols.step_flops,
                                                                cols.step_bytes, cols.step_tokens)), [])
        sums = self._rises.add(RiseBlock(steps, raw, b_e, prev_end, first, after, decay, rises), self.coef)
        best, sigma = vertex(sums.rss(self._prior, self._lam, self._noise2), sums.n_rise)
        if usable(sums.n_rise, sigma):
            self.latency_s = best

    def flop_rel_sigma(self, cols: StepColumns) -> np.ndarray:
        """How well the running fit knows each step's energy per FLOP (at its utilisation): the
        posterior standard deviation relative to the value (``inf`` before the fit has solved)."""
        u = self.coef.utilisation(cols.step_flops, cols.dt)
        if not self.fit or self._best_ne is None:
            return np.full(len(u), np.inf if self.fit else 0.0)
        return flop_energy_rel_sigma(self._best_ne, self.coef.theta, self._lam, self._noise2, u)

    @property
    def needs_refit(self) -> bool:
        """Whether the latency moved so far since the running fit's rows were built that they should be
        built again (see :meth:`restart_fit`)."""
        return abs(self.latency_s - self._fit_latency_s) > REFIT_LATENCY_S

    def restart_fit(self, first: bool) -> None:
        """Forget the running fit's rows (built with another latency); the blocks not yet settled are
        then fitted again (``first``: starting from the first block)."""
        self._ne = {tau: NormalEquations() for tau in ONLINE_TAU_GRID_S}
        self._best_ne = None
        self._fit_latency_s = self.latency_s
        self._first_block = first

    def _reshift(self, after: float) -> None:
        """Changes after ``after`` (not yet settled, nor next to a settled instant) take the current
        latency. Those around a settled instant never move, so the energy there, interpolated between
        them, is what the next block starts from (conservation)."""
        bt = np.asarray(self.b_t)
        k = max(int(np.searchsorted(bt, after, side="right")), 1)
        if k >= len(bt):
            return
        new = np.asarray(self.b_raw[k:]) - self.latency_s
        new = np.maximum(new, bt[k - 1] + 1e-6 * np.arange(1, len(new) + 1))  # still increasing
        self.b_t[k:] = np.maximum.accumulate(new).tolist()


def between_grid_points(taus: list[float], thetas: list[np.ndarray], resid: np.ndarray, k: int):
    """The idle decay time constant between grid points: the vertex of a parabola in log τ through the
    best grid point ``k`` and its neighbours (as offline), with the coefficients interpolated linearly
    in log τ between the two grid points around it. The online grid's steps (2^(1/4)) alone moved the
    prefill total at 0.2 requests/s by up to ~2 % (the twin's 2.5 s lies between 2.38 and 2.83 s)."""
    if not 0 < k < len(taus) - 1:
        return taus[k], thetas[k]
    x = np.log(taus[k - 1: k + 2])
    vertex = parabola_vertex(x, resid[k - 1: k + 2])
    if vertex is None:
        return taus[k], thetas[k]
    xv = float(np.clip(vertex[0], x[0], x[2]))
    j = k - 1 if xv < x[1] else k  # the grid interval [j, j+1] holding the vertex
    w = (xv - np.log(taus[j])) / (np.log(taus[j + 1]) - np.log(taus[j]))
    return float(np.exp(xv)), (1.0 - w) * thetas[j] + w * thetas[j + 1]
