"""One device's state in the online driver: counter change points, running fit."""

from __future__ import annotations

import numpy as np

from wattprint.profiler.attribution.coefficients import COEF_NAMES, Coefficients
from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.attribution.fit import (
    FIT_LAG,
    TAU_GRID_S,
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
        self._ne = {tau: NormalEquations() for tau in TAU_GRID_S}
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
        return float(self.b_t[max(i - FIT_LAG, j, 0)]) if i > 0 and self.b_t else start

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
        # a step counts as capped (its energy known: tdp·dt) only if the running fit and the profile both
        # put it over the cap: a fit that overshoots would otherwise take the steps that could correct it
        # out of the regression, and never come back
        _, capped = self.coef.step_energy(cols)
        capped &= self._prior_coef.step_energy(cols)[1]
        decay = 0.5 ** ((b_t[-1] - b_t[0]) / half_life_s)
        for tau, ne in self._ne.items():
            X, y = fit_rows(cols, self.coef.with_theta(self.coef.theta, tau), b_t, b_e, origin, prev_end, capped,
                            first_is_sample=self._first_block)
            if new_after is not None:
                new = b_t[len(b_t) - len(y):] > new_after
                X, y = X[new], y[new]
            ne.add(X, y, decay)
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
