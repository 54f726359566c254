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


#: the hardware profile's stated uncertainty (1 sigma, relative to each coefficient; the utilisation
#: slope's relative to e_f): coefficients the data cannot determine stay there
PRIOR_REL_SIGMA = np.array([0.25, 0.5, 0.5, 0.5, 0.25, 0.5])
#: floors of those sigmas (W, J/FLOP, J/FLOP, J/B, W, W), for a profile value of 0
PRIOR_SIGMA_FLOOR = np.array([1.0, 1e-16, 1e-16, 1e-14, 1.0, 1.0])
#: a regression row's energy is uncertain by about this long at TDP (the publish-time error of the
#: counter's changes at either end of the row)
ROW_NOISE_S = 0.01
#: a light ridge relative to the data itself, for directions the data barely separates (nearly
#: collinear columns: static power and weight bytes both grow with busy time)
RELATIVE_RIDGE = 1e-3


def prior_precision(prior: Coefficients) -> np.ndarray:
    """Ridge weights that make the fit a posterior with the hardware profile as an absolute prior:
    ``noise² / sigma²`` per coefficient, in the regression's units."""
    theta = prior.theta
    scale = np.abs(theta)
    scale[_FU] = abs(theta[_F])
    sigma = np.maximum(PRIOR_REL_SIGMA * scale, PRIOR_SIGMA_FLOOR)
    return (prior.tdp_w * ROW_NOISE_S) ** 2 / sigma**2


def identified(ne: NormalEquations, lam: np.ndarray) -> np.ndarray:
    """Which coefficients the data determined: the prior's weight in each estimate
    (``diag((XᵀX + Λ)⁻¹ Λ)``) is below one half."""
    try:
        shrink = np.diag(np.linalg.solve(ne.xtx + np.diag(lam), np.diag(lam)))
    except np.linalg.LinAlgError:
        return np.zeros(len(lam), dtype=bool)
    return shrink < 0.5


def fit_report(ne: NormalEquations, lam: np.ndarray) -> dict:
    ok = identified(ne, lam)
    return {"fitted": [n for n, f in zip(COEF_NAMES, ok) if f],
            "from_profile": [n for n, f in zip(COEF_NAMES, ok) if not f]}


def rss(ne: NormalEquations, theta: np.ndarray) -> float:
    """Residual sum of squares of ``theta`` from the sufficient statistics."""
    return float(ne.yty - 2.0 * theta @ ne.xty + theta @ ne.xtx @ theta)


def solve(ne: NormalEquations, prior: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Ridge toward the prior (weights ``lam``, see :func:`prior_precision`) under physical constraints
    (an active set): every coefficient >= 0 but the utilisation slope, which may be negative only as far
    as ``e_f + e_fu·u >= 0`` for every utilisation ``u`` in [0, 1]."""
    lam = lam + RELATIVE_RIDGE * np.diag(ne.xtx) + 1e-300
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
    """Fit one device's coefficients to its counter intervals (global, offline): the idle decay time
    constant from a grid, by residual; the rest by :func:`solve` toward the profile ``coef0``."""
    best = None
    prior = coef0.theta
    lam = prior_precision(coef0)
    for tau in TAU_GRID_S:
        coef = coef0.with_theta(prior, tau)
        capped = None
        for _ in range(4):
            X, y = interval_design(cols, coef, b_t, b_e, origin, prev_end, capped)
            ne = NormalEquations()
            ne.add(X, y)
            theta = solve(ne, prior, lam)
            coef = coef.with_theta(theta, tau)
            _, new_capped = coef.step_energy(cols)
            if capped is not None and np.array_equal(new_capped, capped):
                break
            capped = new_capped
        resid = rss(ne, theta)
        if best is None or resid < best[0]:
            ss_tot = float(np.sum((y - y.mean()) ** 2)) if len(y) > 1 else 0.0
            best = (resid, coef, {"r2": 1.0 - resid / ss_tot if ss_tot > 0 else float("nan"),
                                  "intervals": int(len(y)), "capped_steps": int(capped.sum()),
                                  **fit_report(ne, lam)})
    return best[1], best[2]


def interval_fit(cols: StepColumns, coef: Coefficients, b_t: np.ndarray, b_e: np.ndarray, origin: float,
                 prev_end: float = -FAR_PAST_S) -> dict[str, np.ndarray]:
    """Each counter interval's measured energy and the fitted model's prediction for it (single
    intervals, not the fit's 10-interval windows): the fit's quality, for reports."""
    _, capped = coef.step_energy(cols)
    X, y = interval_design(cols, coef, b_t, b_e, origin, prev_end, capped, lag=1)
    known = (b_e[1:] - b_e[:-1]) - y  # capped steps' energy, moved out of y by the design
    return {"t0": b_t[:-1], "t1": b_t[1:], "measured_j": b_e[1:] - b_e[:-1], "predicted_j": X @ coef.theta + known}
