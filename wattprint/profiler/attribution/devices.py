"""One device's state in the online driver: counter change points, running fit."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wattprint.profiler.attribution.coefficients import Coefficients
from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.attribution.fit import NormalEquations, interval_design, solve
from wattprint.profiler.timeline.counter import CounterTrack


@dataclass
class _DeviceState:
    """One device's counter change points, running fit and stitching offset (online)."""

    coef: Coefficients
    b_t: list = field(default_factory=list)
    b_e: list = field(default_factory=list)
    _last_t: float | None = None
    _last_raw: float | None = None
    _offset: float = 0.0
    resets: int = 0
    ne: NormalEquations = field(default_factory=NormalEquations)
    _prior: np.ndarray | None = None

    def observe(self, t: float, raw_e: float) -> None:
        if self._last_raw is not None and raw_e < self._last_raw:  # counter reset: stitch
            self._offset += self._last_raw
            self.resets += 1
        if self._last_raw is not None and raw_e != self._last_raw:
            self.b_t.append(0.5 * (self._last_t + t))
            self.b_e.append(raw_e + self._offset)
        self._last_t, self._last_raw = t, raw_e

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

    def update_fit(self, cols: StepColumns, b_t: np.ndarray, b_e: np.ndarray, origin: float,
                   prev_end: float, half_life_s: float) -> None:
        if self._prior is None:
            self._prior = self.coef.theta
        if len(b_t) < 3:
            return
        _, capped = self.coef.step_energy(cols)
        X, y = interval_design(cols, self.coef, b_t, b_e, origin, prev_end, capped)
        self.ne.add(X, y, 0.5 ** ((b_t[-1] - b_t[0]) / half_life_s))
        if self.ne.n >= 20:
            self.coef = self.coef.with_theta(_solve(self.ne, self._prior))
