"""The fit: a device's coefficients from its counter intervals (ridge least squares toward the prior)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wattprint.profiler.attribution.coefficients import COEF_NAMES, PROFILE_ONLY_NAMES, Coefficients
from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.attribution.features import FAR_PAST_S, cumulative

TAU_GRID_S = (0.5, 1.0, 2.0, 4.0, 8.0)
#: the online fit cannot refine tau between grid points (it keeps one set of sufficient statistics per
#: tau), so its grid is finer: 0.5 to 8 s in steps of 2^(1/4) (17 values; a block's fit costs ~ms)
ONLINE_TAU_GRID_S = tuple(float(0.5 * 2.0 ** (k / 4)) for k in range(17))
FIT_LAG = 10  # counter intervals per regression window
_F, _FU = COEF_NAMES.index("energy_per_flop_j"), COEF_NAMES.index("energy_per_flop_util_j")
_N = len(COEF_NAMES)


@dataclass
class NormalEquations:
    """Sufficient statistics of the interval regression, so a fit can run online with forgetting."""

    xtx: np.ndarray = field(default_factory=lambda: np.zeros((_N, _N)))
    xty: np.ndarray = field(default_factory=lambda: np.zeros(_N))
    yty: float = 0.0
    n: float = 0.0

    def add(self, X: np.ndarray, y: np.ndarray, decay: float = 1.0) -> None:
        self.xtx = decay * self.xtx + X.T @ X
        self.xty = decay * self.xty + X.T @ y
        self.yty = decay * self.yty + float(y @ y)
        self.n = decay * self.n + len(y)

    def add_from(self, other: NormalEquations, decay: float = 1.0) -> None:
        """Add another set's statistics (this one's forgotten by ``decay`` first)."""
        self.xtx = decay * self.xtx + other.xtx
        self.xty = decay * self.xty + other.xty
        self.yty = decay * self.yty + other.yty
        self.n = decay * self.n + other.n


#: the hardware profile's stated uncertainty (1 sigma, relative to each coefficient; the utilisation
#: slope's relative to e_f): coefficients the data cannot determine stay there. The cap power's is the
#: counter's gain error (a few percent, facts.md: Yang et al.): the cap itself is a setting, known
PRIOR_REL_SIGMA = np.array([0.25, 0.5, 0.5, 0.5, 0.25, 0.5, 0.05])
#: floors of those sigmas (W, J/FLOP, J/FLOP, J/B, W, W, W), for a profile value of 0
PRIOR_SIGMA_FLOOR = np.array([1.0, 1e-16, 1e-16, 1e-14, 1.0, 1.0, 1.0])
#: the physics that ties the idle decay to static power: when a step ends, the device is still clocked
#: up and draws its static power, which then decays to idle, so ``idle_decay_power_w ≈ static_power_w -
#: idle_power_w``; stated uncertainty of that relation (1 sigma, relative to static power). With it, the
#: decay after busy periods (measured at idle power's low noise) informs static power, which busy
#: memory-bound steps alone cannot separate from energy per byte (both grow with the bytes moved).
DECAY_TIE_REL_SIGMA = 0.1
_TIE = np.array([1.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0])  # static - idle - decay
#: the publish-time error of a counter change (s): a regression row's energy is uncertain by this long
#: at the power drawn around each of its two ends (the prior's weights are stated at TDP)
ROW_NOISE_S = 0.01
#: bounds of the residuals' variance relative to the stated noise (see :func:`posterior`)
NOISE_SCALE_MIN, NOISE_SCALE_MAX = 0.25, 16.0
#: a row's ends are weighted as if the power there were at least this fraction of TDP (quantisation,
#: model error: an idle interval is not infinitely informative)
ROW_POWER_FLOOR = 0.1
#: counter intervals on either side of a boundary whose highest power stands for the power around it
ENVELOPE = 2
#: a light ridge relative to the data itself, on static power and energy per byte only: busy
#: memory-bound steps cannot separate them (a step's duration grows with its bytes), and noise along
#: that direction would otherwise decide the KV column. Not on the energy per FLOP and its utilisation
#: slope: the profile states one figure and no slope (the prior's 0 is ignorance, not a value), and a
#: relative ridge there outweighs the data and drags the fit to the profile's split, which static
#: power and energy per byte then compensate (static +12 % on a noiseless A100 twin trace)
RELATIVE_RIDGE = 1e-3
_RELATIVE_RIDGE_ON = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def prior_precision(prior: Coefficients) -> np.ndarray:
    """Ridge weights (a square matrix, one row per coefficient) that make the fit a posterior with the hardware profile as an
    absolute prior: ``noise² / sigma²`` per coefficient, in the regression's units, plus
    the decay tie."""
    theta = prior.theta
    scale = np.abs(theta)
    scale[_FU] = abs(theta[_F])
    sigma = np.maximum(PRIOR_REL_SIGMA * scale, PRIOR_SIGMA_FLOOR)
    noise2 = noise_j2(prior)
    tie_sigma = max(DECAY_TIE_REL_SIGMA * abs(theta[0]), PRIOR_SIGMA_FLOOR[0])
    return np.diag(noise2 / sigma**2) + noise2 / tie_sigma**2 * np.outer(_TIE, _TIE)


def noise_j2(prior: Coefficients) -> float:
    """The rows' noise (J², at TDP) that :func:`prior_precision` states the prior against."""
    return (prior.tdp_w * ROW_NOISE_S) ** 2


def prior_mean(prior: Coefficients) -> np.ndarray:
    """The profile's coefficients, with the idle decay as the tie says (static − idle, at least 0)."""
    theta = prior.theta
    theta[5] = max(theta[0] - theta[4], 0.0)
    return theta


def identified(ne: NormalEquations, lam: np.ndarray) -> np.ndarray:
    """Which coefficients the data determined: the prior's weight in each estimate
    (``diag((XᵀX + Λ)⁻¹ Λ)``) is below one half."""
    lam = np.diag(lam) if lam.ndim == 1 else lam
    try:
        shrink = np.diag(np.linalg.solve(ne.xtx + lam, lam))
    except np.linalg.LinAlgError:
        return np.zeros(len(lam), dtype=bool)
    return shrink < 0.5


def fit_report(ne: NormalEquations, lam: np.ndarray) -> dict:
    ok = identified(ne, lam)
    return {"fitted": [n for n, f in zip(COEF_NAMES, ok) if f],
            "from_profile": [n for n, f in zip(COEF_NAMES, ok) if not f] + list(PROFILE_ONLY_NAMES)}


def rss(ne: NormalEquations, theta: np.ndarray) -> float:
    """Residual sum of squares of ``theta`` from the sufficient statistics."""
    return float(ne.yty - 2.0 * theta @ ne.xty + theta @ ne.xtx @ theta)


def posterior(ne: NormalEquations, prior: np.ndarray, lam: np.ndarray, noise2: float) -> np.ndarray:
    """:func:`solve` with the prior weighed against the noise the rows actually show: ``lam`` is stated
    for rows uncertain by ``noise2`` (J², see :func:`prior_precision`); the residuals' variance replaces
    it (a meter polled more coarsely, or a noisier board, leaves more to the profile)."""
    theta = solve(ne, prior, lam)
    scale = noise_scale(ne, theta, noise2)
    return theta if scale is None else solve(ne, prior, lam * scale)


def noise_scale(ne: NormalEquations, theta: np.ndarray, noise2: float) -> float | None:
    """The residuals' variance relative to the stated noise (within its bounds); None while the rows
    are too few to say (fewer than twice the coefficients)."""
    dof = ne.n - len(theta)
    if dof < len(theta):
        return None
    return float(np.clip(rss(ne, theta) / dof / noise2, NOISE_SCALE_MIN, NOISE_SCALE_MAX))


def flop_energy_rel_sigma(ne: NormalEquations, theta: np.ndarray, lam: np.ndarray, noise2: float,
                          u: np.ndarray) -> np.ndarray:
    """How well the rows determine the energy per FLOP ``e_f + e_fu·u`` at each utilisation ``u``: its
    posterior standard deviation relative to its value (``inf`` where the value is 0). The posterior
    covariance is ``noise² · scale · (XᵀX + scale·Λ)⁻¹`` (the constraints and the light relative ridge
    left out)."""
    scale = noise_scale(ne, theta, noise2)
    scale = 1.0 if scale is None else scale
    lam = np.diag(lam) if lam.ndim == 1 else lam
    try:
        cov = noise2 * scale * np.linalg.inv(ne.xtx + scale * lam)
    except np.linalg.LinAlgError:
        return np.full(np.shape(u), np.inf)
    u = np.asarray(u, dtype=float)
    var = cov[_F, _F] + 2.0 * u * cov[_F, _FU] + u * u * cov[_FU, _FU]
    value = theta[_F] + theta[_FU] * u
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(value > 0, np.sqrt(np.maximum(var, 0.0)) / value, np.inf)


def solve(ne: NormalEquations, prior: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Ridge toward the prior (weights ``lam``, see :func:`prior_precision`) under physical constraints
    (an active set): every coefficient >= 0 but the utilisation slope, which may be negative only as far
    as ``e_f + e_fu·u >= 0`` for every utilisation ``u`` in [0, 1]."""
    lam = np.diag(lam) if lam.ndim == 1 else lam
    lam = lam + np.diag(RELATIVE_RIDGE * _RELATIVE_RIDGE_ON * np.diag(ne.xtx) + 1e-300)
    H = ne.xtx + lam
    g = ne.xty + lam @ prior
    free = np.ones(len(prior), dtype=bool)
    theta = prior.copy()
    for _ in range(8):
        idx = np.flatnonzero(free)
        fixed = ~free
        A = H[np.ix_(idx, idx)]
        b = g[idx] - H[np.ix_(idx, np.flatnonzero(fixed))] @ theta[fixed]
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


def row_weights(b_t: np.ndarray, b_e: np.ndarray, lag: int, tdp_w: float) -> np.ndarray:
    """Each regression row's weight: its energy is uncertain by the publish-time error times the power
    drawn around each of its two ends, so rows ending in idle periods (a tenth of TDP) tell ~50× more
    than rows ending in busy ones; relative to a row whose ends are both at TDP (the prior's scale).

    The power around a boundary is the highest of the ``ENVELOPE`` counter intervals on either side:
    where power changes (a busy period ends), what the device drew in the first tens of milliseconds
    after it (a fast tail no 100 ms counter resolves) is not known better than the busy power."""
    n = len(b_t)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_int = np.diff(b_e) / np.diff(b_t)  # each interval's mean power
    p_int = np.nan_to_num(p_int, nan=tdp_w, posinf=tdp_w, neginf=0.0)
    padded = np.concatenate([np.full(ENVELOPE, -np.inf), p_int, np.full(ENVELOPE, -np.inf)])
    # boundary k sits between intervals k-1 and k: the envelope over intervals k-ENVELOPE .. k+ENVELOPE-1
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * ENVELOPE)[:n]
    p = windows.max(axis=1) if n > 1 else np.full(n, tdp_w)
    p = np.maximum(np.nan_to_num(p, neginf=tdp_w), ROW_POWER_FLOOR * tdp_w)
    return 2.0 * tdp_w**2 / (p[lag:] ** 2 + p[:-lag] ** 2)


def _cumulative_columns(cols: StepColumns, coef: Coefficients, t: np.ndarray, capped: np.ndarray,
                        origin: float, prev_end: float) -> np.ndarray:
    """Cumulative [dt, F, F·u, B, capped time, idle time, decay integral] at each time ``t``; the fast
    tail in the gap after each step adds to its dynamic columns (``tail_fraction`` × its dynamic power:
    F, F·u and B per second of a free step; cap minus static power for a capped one)."""
    feats = coef.step_features(cols)
    free_feats = np.where(capped[:, None], 0.0, feats)
    capped_dt = np.where(capped, feats[:, 0], 0.0)
    vals = np.column_stack([free_feats, capped_dt])
    tails = None
    if coef.tail_fraction > 0:
        per_s = coef.tail_fraction / np.maximum(feats[:, 0], 1e-12)
        tails = np.column_stack([-coef.tail_fraction * capped, free_feats[:, 1:] * per_s[:, None],
                                 coef.tail_fraction * capped])
    cv, ci, cd, ct = cumulative(t, cols.t_start, cols.t_end, vals, coef.tau_s, origin, prev_end,
                                tails, coef.tail_tau_s)
    return np.column_stack([cv + ct, ci, cd])


def interval_design(cols: StepColumns, coef: Coefficients, b_t: np.ndarray, b_e: np.ndarray,
                    origin: float, prev_end: float, capped: np.ndarray | None = None, lag: int = FIT_LAG):
    """Regression rows: the energy between boundary k and boundary k+lag, for every k.

    Overlapping windows of ``lag`` counter intervals (~1 s): the error of an estimated publish time
    enters a window once instead of every 100 ms interval, while the windows still resolve how the
    mix of prefill and decode changes. A capped step enters only by its duration, the cap power's
    column (its energy is the cap power on the counter's scale times its duration).
    Returns (X [rows, coefficients], y [rows]).
    """
    if capped is None:
        capped = np.zeros(len(cols.t_start), dtype=bool)
    c = _cumulative_columns(cols, coef, b_t, capped, origin, prev_end)
    lag = max(1, min(lag, len(b_t) - 1))
    d = c[lag:] - c[:-lag]
    X = np.column_stack([d[:, 0:4], d[:, 5], d[:, 6], d[:, 4]])
    y = b_e[lag:] - b_e[:-lag]
    return X, y


def fit_rows(cols: StepColumns, coef: Coefficients, b_t: np.ndarray, b_e: np.ndarray, origin: float,
             prev_end: float, capped: np.ndarray | None = None, lag: int = FIT_LAG, first_is_sample: bool = False):
    """The fit's rows: :func:`interval_design`, each row weighted by :func:`row_weights`. Returns (X, y).

    ``first_is_sample``: the first boundary is the meter's first sample, not a change of the counter
    (the edge rule): its value was published up to a whole publish period earlier, so the rows from it
    are left out of the fit (settlement still uses it)."""
    X, y = interval_design(cols, coef, b_t, b_e, origin, prev_end, capped, lag)
    w = np.sqrt(row_weights(b_t, b_e, max(1, min(lag, len(b_t) - 1)), coef.tdp_w))
    if first_is_sample and len(w) > 1:
        w[0] = 0.0
    return X * w[:, None], y * w


def fit_device(cols: StepColumns, coef0: Coefficients, b_t: np.ndarray, b_e: np.ndarray,
               origin: float, prev_end: float = -FAR_PAST_S, first_is_sample: bool = True) -> tuple[Coefficients, dict]:
    """Fit one device's coefficients to its counter intervals (global, offline): the idle decay time
    constant by residual (a grid, then the vertex of a parabola in log τ through the best three); the
    rest by :func:`posterior` toward the profile ``coef0``.
    ``first_is_sample``: ``b_t[0]`` is the first sample (see :func:`fit_rows`)."""
    prior = prior_mean(coef0)
    lam = prior_precision(coef0)

    def at(tau: float):
        coef = coef0.with_theta(prior, tau)
        capped = None
        for _ in range(4):
            X, y = fit_rows(cols, coef, b_t, b_e, origin, prev_end, capped, first_is_sample=first_is_sample)
            ne = NormalEquations()
            ne.add(X, y)
            theta = posterior(ne, prior, lam, noise_j2(coef0))
            coef = coef.with_theta(theta, tau)
            _, new_capped = coef.step_energy(cols)
            if capped is not None and np.array_equal(new_capped, capped):
                break
            capped = new_capped
        resid = rss(ne, theta)
        ss_tot = float(np.sum((y - y.mean()) ** 2)) if len(y) > 1 else 0.0
        return resid, coef, {"r2": 1.0 - resid / ss_tot if ss_tot > 0 else float("nan"),
                             "intervals": int(len(y)), "capped_steps": int(capped.sum()), **fit_report(ne, lam)}

    fits = [at(tau) for tau in TAU_GRID_S]
    k = int(np.argmin([f[0] for f in fits]))
    best = fits[k]
    if 0 < k < len(fits) - 1:
        x = np.log(TAU_GRID_S[k - 1: k + 2])
        r = np.array([f[0] for f in fits[k - 1: k + 2]])
        vertex = parabola_vertex(x, r)
        if vertex is not None:
            refined = at(float(np.exp(vertex[0])))
            if refined[0] < best[0]:
                best = refined
    return best[1], best[2]


def parabola_vertex(x: np.ndarray, r: np.ndarray) -> tuple[float, float] | None:
    """Through three equally spaced points ``(x, r)``: the vertex's ``x`` and the curvature ``d²r/dx²``;
    None where the parabola does not open upward. The grid refinement of the idle decay time constant
    (offline and online) and of the counter's latency."""
    h = x[1] - x[0]
    curv = (r[2] - 2.0 * r[1] + r[0]) / h**2
    if curv <= 0:
        return None
    return float(x[1] - (r[2] - r[0]) / (2.0 * h) / curv), float(curv)


def interval_fit(cols: StepColumns, coef: Coefficients, b_t: np.ndarray, b_e: np.ndarray, origin: float,
                 prev_end: float = -FAR_PAST_S) -> dict[str, np.ndarray]:
    """Each counter interval's measured energy and the fitted model's prediction for it (single
    intervals, not the fit's 10-interval windows): the fit's quality, for reports."""
    _, capped = coef.step_energy(cols)
    X, y = interval_design(cols, coef, b_t, b_e, origin, prev_end, capped, lag=1)
    return {"t0": b_t[:-1], "t1": b_t[1:], "measured_j": y, "predicted_j": X @ coef.theta}
