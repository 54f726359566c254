"""One device's state in the online driver: counter change points, running fit."""

from __future__ import annotations

import numpy as np

from wattprint.profiler.attribution.coefficients import COEF_NAMES, Coefficients
from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.attribution.fit import (
    FIT_LAG,
    ONLINE_TAU_GRID_S,
    NormalEquations,
    fit_report,
    fit_rows,
    noise_j2,
    posterior,
    prior_mean,
    prior_precision,
    rss,
)
from wattprint.profiler.timeline.counter import CounterTrack


class OnlineDevice:
    """One device's counter change points (the timeline's counter rule), running fit (online)."""

    def __init__(self, coef: Coefficients, publish: str = "midpoint", fit: bool = True):
        self.coef = coef
        self.fit = fit
        self.track = CounterTrack(publish)
        self.b_t: list[float] = []  # estimated publish times of the counter's changes
        self.b_e: list[float] = []  # stitched cumulative joules there
        self._prior = prior_mean(coef)
        self._prior_coef = coef.with_theta(self._prior)
        self._first_block = True
        self._lam = prior_precision(coef)
        self._noise2 = noise_j2(coef)
        #: one set of sufficient statistics per idle-decay time constant: tau is fitted online too
        self._ne = {tau: NormalEquations() for tau in ONLINE_TAU_GRID_S}
        self.report: dict = {"fitted": [], "from_profile": list(COEF_NAMES)}

    @property
    def resets(self) -> int:
        return self.track.resets

    def observe(self, t: float, raw_e: float) -> None:
        first = self.track.value_j is None
        cp = self.track.feed(t, raw_e)
        if first:  # the first sample bounds the energy up to its time (the edge rule, as offline)
            self.b_t.append(t)
            self.b_e.append(raw_e)
        elif cp is not None:
            self.b_t.append(cp.t_pub_s)
            self.b_e.append(cp.energy_j)

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

    def fit_origin(self, start: float, not_before: float) -> float:
        """Where a block's fit rows begin: ``FIT_LAG`` change points before the block's ``start`` (but not
        before ``not_before``), so that its rows continue the previous block's (see :meth:`update_fit`)."""
        i = int(np.searchsorted(self.b_t, start, side="left"))
        j = int(np.searchsorted(self.b_t, not_before, side="left"))
        return float(self.b_t[max(i - FIT_LAG, j, 0)]) if i > 0 else start

    def update_fit(self, cols: StepColumns, b_t: np.ndarray, b_e: np.ndarray, origin: float,
                   prev_end: float, half_life_s: float, new_after: float | None = None) -> None:
        """Add a block's counter intervals to the running fit (forgetting with ``half_life_s``) and
        re-solve for every grid time constant; keep the one with the least residual.

        ``b_t`` may begin before the block (at :meth:`fit_origin`): only the rows that end after
        ``new_after`` (the block's start) are new, so every counter interval enters as many rows as
        offline, not only those away from block edges (a prefill at the start of a block would count
        a tenth as much as offline)."""
        if not self.fit or len(b_t) < 3:
            return
        # rows holding a step the profile puts at the power cap are left out: a capped step's energy (tdp·dt)
        # says nothing about the coefficients, and letting the running fit decide which steps are capped
        # (as offline, which iterates over the whole trace) feeds its early errors back into the rows it
        # learns from - one that undershoots takes capped steps for uncapped ones and learns its own error,
        # one that overshoots drops the rows that could correct it. A trace at the cap throughout leaves the
        # coefficients at the profile, and the report says so
        keep = rows_clear_of(b_t, cols.t_start, cols.t_end, self._prior_coef.step_energy(cols)[1])
        if new_after is not None:  # and only the rows that end inside this block are new
            keep &= b_t[len(b_t) - len(keep):] > new_after
        decay = 0.5 ** ((b_t[-1] - b_t[0]) / half_life_s)
        for tau, ne in self._ne.items():
            X, y = fit_rows(cols, self.coef.with_theta(self.coef.theta, tau), b_t, b_e, origin, prev_end,
                            first_is_sample=self._first_block)
            ne.add(X[keep], y[keep], decay)
        self._first_block = False  # its first boundary was the first sample, not a change (see fit_rows)
        if next(iter(self._ne.values())).n < 20:
            return
        best = None
        for tau, ne in self._ne.items():
            theta = posterior(ne, self._prior, self._lam, self._noise2)
            r = rss(ne, theta)
            if best is None or r < best[0]:
                best = (r, theta, tau, ne)
        _, theta, tau, ne = best
        self.coef = self.coef.with_theta(theta, tau)
        self.report = fit_report(ne, self._lam)


def rows_clear_of(b_t: np.ndarray, t_start: np.ndarray, t_end: np.ndarray, flagged: np.ndarray,
                  lag: int = FIT_LAG) -> np.ndarray:
    """For each fit row (the window from boundary k to boundary k+lag, as :func:`fit_rows` builds them):
    True when no flagged step overlaps it (steps sorted and not overlapping)."""
    lag = max(1, min(lag, len(b_t) - 1))
    ts, te = t_start[flagged], t_end[flagged]
    overlapping = np.searchsorted(ts, b_t[lag:], side="left") - np.searchsorted(te, b_t[:-lag], side="right")
    return overlapping <= 0
