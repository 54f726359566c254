"""The fit: a device's coefficients from its counter intervals (ridge least squares toward the prior)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wattprint.profiler.attribution.coefficients import COEF_NAMES, Coefficients
from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.attribution.features import FAR_PAST_S, cumulative

TAU_GRID_S = (0.5, 1.0, 2.0, 4.0, 8.0)
FIT_LAG = 10  # counter intervals per regression window
_F, _FU = COEF_NAMES.index("energy_per_flop_j"), COEF_NAMES.index("energy_per_flop_util_j")


@dataclass
class NormalEquations:
    """Sufficient statistics of the interval regression, so a fit can run online with forgetting."""

    xtx: np.ndarray = field(default_factory=lambda: np.zeros((6, 6)))
    xty: np.ndarray = field(default_factory=lambda: np.zeros(6))
    yty: float = 0.0
    n: float = 0.0

    def add(self, X: np.ndarray, y: np.ndarray, decay: float = 1.0) -> None:
        self.xtx = decay * self.xtx + X.T @ X
        self.xty = decay * self.xty + X.T @ y
        self.yty = decay * self.yty + float(y @ y)
        self.n = decay * self.n + len(y)


def solve(ne: NormalEquations, prior: np.ndarray, strength: float = 1e-3) -> np.ndarray:
    """Ridge toward the prior under physical constraints (an active set): every coefficient >= 0 but
    the utilisation slope, which may be negative only as far as ``e_f + e_fu·u >= 0`` for every
    utilisation ``u`` in [0, 1]."""
    diag = np.diag(ne.xtx).copy()
    lam = strength * np.maximum(diag, 1e-30) + 1e-30
    free = np.ones(6, dtype=bool)
    theta = prior.copy()
    for _ in range(8):
        idx = np.flatnonzero(free)
        A = ne.xtx[np.ix_(idx, idx)] + np.diag(lam[idx])
        fixed = ~free
        b = ne.xty[idx] + lam[idx] * prior[idx] - ne.xtx[np.ix_(idx, np.flatnonzero(fixed))] @ theta[fixed]
        try:
            sol = np.linalg.solve(A, b)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(A, b, rcond=None)[0]
        theta[idx] = sol
        neg = [j for j in idx if theta[j] < 0 and j != _FU]
        if free[_FU] and theta[_F] + theta[_FU] < 0 and not (free[_F] and theta[_F] < 0):
            theta[_FU] = -max(theta[_F], 0.0)  # the slope may at most cancel e_f at full utilisation
            free[_FU] = False
            continue
        if not neg:
            break
        for j in neg:
            theta[j] = 0.0
            free[j] = False
    if theta[_F] + theta[_FU] < 0:  # e_f was clamped after the slope was fixed
        theta[_FU] = -theta[_F]
    return theta


def interval_design(cols: StepColumns, coef: Coefficients, b_t: np.ndarray, b_e: np.ndarray,
                    origin: float, prev_end: float, capped: np.ndarray | None = None, lag: int = FIT_LAG):
    """Regression rows: the energy between boundary k and boundary k+lag, for every k.

    Overlapping windows of ``lag`` counter intervals (~1 s): the error of an estimated publish time
    enters a window once instead of every 100 ms interval, while the windows still resolve how the
    mix of prefill and decode changes. Capped steps' known energy (tdp·dt) is moved to y.
    Returns (X [rows, 6], y [rows]).
    """
    feats = coef.step_features(cols)
    if capped is None:
        capped = np.zeros(len(feats), dtype=bool)
    free_feats = np.where(capped[:, None], 0.0, feats)
    known = np.where(capped, coef.tdp_w * feats[:, 0], 0.0)
    vals = np.column_stack([free_feats, known])
    cv, ci, cd = cumulative(b_t, cols.t_start, cols.t_end, vals, coef.tau_s, origin, prev_end)
    c = np.column_stack([cv, ci, cd])
    lag = max(1, min(lag, len(b_t) - 1))
    d = c[lag:] - c[:-lag]
    X = np.column_stack([d[:, 0:4], d[:, 5], d[:, 6]])
    y = (b_e[lag:] - b_e[:-lag]) - d[:, 4]
    return X, y


def fit_device(cols: StepColumns, coef0: Coefficients, b_t: np.ndarray, b_e: np.ndarray,
               origin: float, prev_end: float = -FAR_PAST_S) -> tuple[Coefficients, dict]:
    """Fit one device's coefficients to its counter intervals (global, offline)."""
    best = None
    for tau in TAU_GRID_S:
        coef = coef0.with_theta(coef0.theta, tau)
        prior = coef0.theta
        capped = None
        for _ in range(4):
            X, y = interval_design(cols, coef, b_t, b_e, origin, prev_end, capped)
            ne = NormalEquations()
            ne.add(X, y)
            theta = solve(ne, prior)
            coef = coef.with_theta(theta, tau)
            _, new_capped = coef.step_energy(cols)
            if capped is not None and np.array_equal(new_capped, capped):
                break
            capped = new_capped
        resid = float(np.sum((X @ theta - y) ** 2))
        if best is None or resid < best[0]:
            ss_tot = float(np.sum((y - y.mean()) ** 2)) if len(y) > 1 else 0.0
            best = (resid, coef, {"r2": 1.0 - resid / ss_tot if ss_tot > 0 else float("nan"),
                                  "intervals": int(len(y)), "capped_steps": int(capped.sum())})
    return best[1], best[2]
