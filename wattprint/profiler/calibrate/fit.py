"""The regression: ``E = P_static·T + e_flop·F + e_byte·B + e_kv·K`` over the runs, by weighted least
squares, with Student-t confidence intervals and R²."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wattprint.errors import WattprintError
from wattprint.profiler.calibrate.analysis import RunResult
from wattprint.profiler.calibrate.stats import student_t_quantile

CONFIDENCE = 0.95

#: fitted coefficient -> regression column
COEFFICIENTS = {
    "static_power_w": "duration_s",
    "energy_per_flop_j": "flops",
    "energy_per_byte_j": "dram_bytes",
    "energy_per_kv_byte_j": "kv_bytes",
}


@dataclass
class FitResult:
    """The regression's outcome: one entry per fitted coefficient (names from :data:`COEFFICIENTS`)."""

    names: list[str]
    estimate: np.ndarray
    std_error: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    r2: float  # of mean power (E/T) against the model's, over the runs
    rms_relative_residual: float
    n: int
    dof: int
    t_quantile: float
    weighted: bool

    def get(self, name: str) -> float | None:
        return float(self.estimate[self.names.index(name)]) if name in self.names else None

    def interval(self, name: str) -> tuple[float, float]:
        i = self.names.index(name)
        return float(self.ci_low[i]), float(self.ci_high[i])


def fit_energy_model(runs: list[RunResult], weighted: bool = True, confidence: float = CONFIDENCE) -> FitResult:
    """Least squares of ``E = P_static·T + e_flop·F + e_byte·B + e_kv·K`` over the runs.

    Weighted: each run's equation is divided by its fitted energy (two passes: OLS, then WLS with
    weights ``1/Ê²``), so every run counts by its *relative* error. Columns that are zero in every run
    (no KV runs, say) are left out. Confidence intervals: ``estimate ± t(dof)·se`` with
    ``se² = s²·diag((XᵀWX)⁻¹)``, ``s²`` the weighted residual variance, ``dof = n - p``.
    """
    names = [n for n, col in COEFFICIENTS.items() if any(r.row()[col] != 0.0 for r in runs)]
    cols = [COEFFICIENTS[n] for n in names]
    X = np.array([[r.row()[c] for c in cols] for r in runs], dtype=float)
    y = np.array([r.energy_j for r in runs], dtype=float)
    n, p = X.shape
    if n <= p:
        raise WattprintError(f"{n} runs cannot determine {p} coefficients")
    scale = np.sqrt(np.mean(X * X, axis=0))  # columns span 1 s to 1e15 FLOPs: solve in scaled units
    scale[scale == 0] = 1.0
    Xs = X / scale

    def solve(weights):
        A = Xs * weights[:, None]
        b = y * weights
        beta, *_ = np.linalg.lstsq(A, b, rcond=None)
        return beta, A, b

    beta, A, b = solve(np.ones(n))
    if weighted:
        fitted = np.clip(Xs @ beta, 1e-12 * max(y.max(), 1e-300), None)
        beta, A, b = solve(1.0 / fitted)
    resid = b - A @ beta
    dof = n - p
    s2 = float(resid @ resid) / dof
    cov = s2 * np.linalg.pinv(A.T @ A)
    est = beta / scale
    se = np.sqrt(np.clip(np.diag(cov), 0.0, None)) / scale
    tq = student_t_quantile(0.5 + confidence / 2.0, dof)
    power = y / X[:, 0] if "static_power_w" in names else y
    power_hat = (X @ est) / X[:, 0] if "static_power_w" in names else X @ est
    ss_tot = float(np.sum((power - power.mean()) ** 2))
    r2 = 1.0 - float(np.sum((power - power_hat) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    rel = (y - X @ est) / y
    return FitResult(names, est, se, est - tq * se, est + tq * se, r2, float(np.sqrt(np.mean(rel * rel))),
                     n, dof, tq, weighted)
