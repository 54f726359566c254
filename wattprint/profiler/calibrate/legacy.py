"""``wattprint calibrate``: measure a GPU's energy coefficients and write a hardware profile.

The procedure (``docs/calibration.md`` explains each step and how to read the result):

1. Idle power over a quiet window.
2. A plan of runs: the four calibration kernels (:mod:`wattprint.kernels`) at several sizes, occupancies,
   intensities, context lengths and page orders, each repeated ``--trials`` times, in random order.
3. Each run launches its kernel back to back for at least ``--seconds`` after the rise time (and at
   least 32 launches unless they would take more than four times as long), polling the energy counter
   meanwhile; a cool-down follows.
4. Each run's energy is taken between two republications of the counter (its value changes about every
   100 ms): the first after the rise time and the last before the end of the run. The work done in
   that window follows from the launch completion times and the kernels' analytic counts.
5. Weighted least squares over the runs, ``E = P_static·T + e_flop·F + e_byte·B + e_kv·K``, gives the
   coefficients with 95 % confidence intervals (Student t) and R².
6. The profile is written atomically: an interruption leaves no profile (or the previous one).

``--meter simulated`` runs the same plan and the same analysis on :class:`SimulatedDevice`: no kernel
runs, no time passes; the kernels' analytic counts and a throughput model drive a power trace
(:class:`~wattprint.profiler.twin.power.PowerTrace`) read through an NVML-like counter
(:class:`~wattprint.profiler.twin.power.SensorEffects`), with the coefficients of a TRUE profile.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wattprint.errors import MeterError, WattprintError
from wattprint.kernels import KernelWork
from wattprint.kernels.compute import compute_work
from wattprint.kernels.intensity import intensity_work, nominal_intensity
from wattprint.kernels.kv_gather import kv_gather_work
from wattprint.kernels.stream import stream_copy_work, stream_sum_work
from wattprint.profiler.core.hardware import HardwareProfile, load_profile, save_profile
from wattprint.profiler.twin.power import GpuTwin, PowerTrace, SensorEffects, poll_counter, poll_times

DEFAULT_SIM_PROFILE = "h100-sxm"
DEFAULT_SECONDS = 5.0
DEFAULT_RISE_S = 1.0  # power settles within a few hundred ms of a kernel starting; discard 1 s
MIN_LAUNCHES = 32
CONFIDENCE = 0.95
NEAR_LIMIT_FRACTION = 0.97  # a run whose mean power reaches this share of the power limit is flagged

#: fitted coefficient -> regression column
COEFFICIENTS = {
    "static_power_w": "duration_s",
    "energy_per_flop_j": "flops",
    "energy_per_byte_j": "dram_bytes",
    "energy_per_kv_byte_j": "kv_bytes",
}


# ============================================================================================== plan
@dataclass(frozen=True)
class RunSpec:
    """One run of the plan: a kernel configuration and the work of one launch."""

    kernel: str  # stream_sum, stream_copy, compute, intensity, kv_gather
    label: str
    params: dict = field(hash=False)
    work: KernelWork
    trial: int = 0


# Sizes for the GPU plan. Every buffer is many times an H100's 50 MiB L2, so repeated launches
# stream from DRAM; launches take milliseconds to a fraction of a second.
STREAM_SUM_ELEMENTS = 1 << 28  # float32: 1 GiB
STREAM_COPY_ELEMENTS = 1 << 29  # bfloat16: 1 GiB read, 1 GiB written
STREAM_BLOCK = 4096
COMPUTE_TILE = (128, 128, 64)  # BM, BN, BK (bf16)
COMPUTE_REPEATS = 8192  # ~2e12 FLOPs per launch at 132 programs; ~1.7e5 FLOP per DRAM byte
INTENSITY_TILE = (64, 32, 64)  # BM, BN, BK (bf16): intensity ≈ 32·repeats FLOP/B
INTENSITY_TILES = 1 << 16  # 512 MiB of bf16 tiles
INTENSITY_REPEATS = (1, 2, 4, 8, 16, 32)
KV_GEOMETRY = {"num_heads": 32, "num_kv_heads": 8, "head_size": 128, "block_size": 16}  # Llama-3-8B-like
KV_CONTEXTS = (256, 1024, 4096, 16384)
KV_BYTES_PER_LAUNCH = 512 << 20
BF16 = 2


def build_plan(n_sm: int = 132, trials: int = 2, rng: np.random.Generator | None = None) -> list[RunSpec]:
    """The calibration runs for a GPU with ``n_sm`` SMs, ``trials`` of each, shuffled by ``rng``."""
    if n_sm <= 0 or trials <= 0:
        raise ValueError("n_sm and trials must be positive")
    configs: list[tuple[str, str, dict, KernelWork]] = []
    for progs in sorted({max(1, n_sm // 4), n_sm, 4 * n_sm}):
        params = {"n_elements": STREAM_SUM_ELEMENTS, "num_programs": progs, "block": STREAM_BLOCK}
        configs.append(("stream_sum", f"stream sum 1 GiB fp32, {progs} programs", params,
                        stream_sum_work(STREAM_SUM_ELEMENTS, 4, progs, STREAM_BLOCK)))
    for progs in sorted({n_sm, 4 * n_sm}):
        params = {"n_elements": STREAM_COPY_ELEMENTS, "num_programs": progs, "block": STREAM_BLOCK}
        configs.append(("stream_copy", f"stream copy 1 GiB bf16, {progs} programs", params,
                        stream_copy_work(STREAM_COPY_ELEMENTS, BF16, progs, STREAM_BLOCK)))
    bm, bn, bk = COMPUTE_TILE
    for progs in sorted({max(1, n_sm // 4), max(1, n_sm // 2), n_sm, 2 * n_sm}):
        params = {"num_programs": progs, "repeats": COMPUTE_REPEATS, "bm": bm, "bn": bn, "bk": bk}
        configs.append(("compute", f"compute tl.dot {bm}x{bn}x{bk}, {progs} programs", params,
                        compute_work(progs, COMPUTE_REPEATS, bm, bn, bk, BF16)))
    bm, bn, bk = INTENSITY_TILE
    for reps in INTENSITY_REPEATS:
        progs = 4 * n_sm
        params = {"n_tiles": INTENSITY_TILES, "num_programs": progs, "repeats": reps, "bm": bm, "bn": bn, "bk": bk}
        configs.append(("intensity", f"intensity ~{nominal_intensity(reps, bn, BF16):.0f} FLOP/B", params,
                        intensity_work(INTENSITY_TILES, progs, reps, bm, bn, bk, BF16)))
    g = KV_GEOMETRY
    token_bytes = 2 * g["num_kv_heads"] * g["head_size"] * BF16
    for ctx in KV_CONTEXTS:
        num_seqs = max(8, KV_BYTES_PER_LAUNCH // (ctx * token_bytes))
        for order in ("sequential", "random"):
            params = {"context": ctx, "num_seqs": num_seqs, "order": order, **g}
            work = kv_gather_work([ctx] * num_seqs, g["num_heads"], g["num_kv_heads"], g["head_size"],
                                  g["block_size"], BF16, q_element_size=BF16)
            configs.append(("kv_gather", f"kv gather ctx {ctx} x{num_seqs}, {order} pages", params, work))
    plan = [RunSpec(k, label, params, work, trial) for trial in range(trials) for k, label, params, work in configs]
    if rng is not None:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def launches_needed(launch_s: float, seconds: float, rise_s: float) -> int:
    """Launches for one run: at least ``seconds`` after the rise time, and at least 32 launches after it
    unless those would take longer than ``4·seconds``."""
    launch_s = max(launch_s, 1e-9)
    by_time = math.ceil((rise_s + seconds) / launch_s)
    by_count = math.ceil(rise_s / launch_s) + MIN_LAUNCHES
    return max(by_time, min(by_count, math.ceil((rise_s + 4 * seconds) / launch_s)), 2)


# ======================================================================================= measurement
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


def counter_edges(poll_t_s: np.ndarray, poll_e_j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Estimated republication times of a cumulative counter and the value published then.

    A republication happened between the last poll that saw the old value and the first that saw the
    new one; its time is taken as their midpoint (error at most half a poll period).
    """
    t = np.asarray(poll_t_s, dtype=float)
    e = np.asarray(poll_e_j, dtype=float)
    changed = np.flatnonzero(np.diff(e) != 0.0) + 1
    return 0.5 * (t[changed - 1] + t[changed]), e[changed]


def counter_window(poll_t_s, poll_e_j, t_lo_s: float, t_hi_s: float) -> tuple[float, float, float]:
    """``(t_a, t_b, joules)`` between the first republication at or after ``t_lo_s`` and the last at or
    before ``t_hi_s``. Raises :class:`MeterError` when the window holds fewer than two."""
    te, ee = counter_edges(poll_t_s, poll_e_j)
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


# ====================================================================================== statistics
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, dof: float) -> float:
    """P(T ≤ t) for Student's t with ``dof`` degrees of freedom (exact, via the incomplete beta)."""
    tail = 0.5 * betainc(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, dof: float) -> float:
    """The ``p`` quantile of Student's t (bisection on the exact CDF; the normal quantile past 1e7 dof)."""
    if not 0.0 < p < 1.0 or dof <= 0:
        raise ValueError("need 0 < p < 1 and dof > 0")
    if dof > 1e7:
        from statistics import NormalDist

        return NormalDist().inv_cdf(p)
    if p < 0.5:
        return -student_t_quantile(1.0 - p, dof)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, dof) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


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


# ================================================================================= simulated device
@dataclass
class SimParams:
    """The simulated GPU's behaviour beyond its profile's coefficients."""

    n_sm: int = 132
    poll_hz: float = 500.0
    launch_overhead_s: float = 5e-6
    compute_efficiency: float = 0.80  # of peak_flops on tensor cores (facts.md: ~798 of 989 TFLOP/s)
    stream_efficiency: float = 0.92  # of peak bandwidth (facts.md: copy ~3.0 of 3.35 TB/s)
    kv_efficiency: dict = field(default_factory=lambda: {"sequential": 0.85, "random": 0.78})
    rise_tau_s: float = 0.15  # power ramps after a run starts (clocks, voltage)
    run_power_noise: float = 0.01  # relative std of a run's dynamic power (data, clock jitter)
    run_speed_noise: float = 0.02  # relative std of a run's throughput
    launch_jitter: float = 0.005  # relative std of each launch's duration
    ambient_c: float = 30.0
    thermal_k_per_w: float = 0.05  # steady temperature rise per watt
    thermal_tau_s: float = 60.0
    leakage_per_k: float = 0.002  # static power rises 0.2 %/K (thermal drift)
    reference_load: float = 0.4  # the TRUE static power holds at the steady temperature of this share of TDP


class SimulatedDevice:
    """A GPU twin for calibration: analytic work -> throughput -> power trace -> NVML-like counter.

    Time is virtual: ``idle``, ``run`` and ``cooldown`` advance a clock and append segments to a
    :class:`PowerTrace`; the counter is sampled at :func:`poll_times` through :class:`SensorEffects`
    (republication every ~100 ms with jitter, latency, a board gain, millijoule quantisation) and
    :func:`poll_counter`. On top: a rise time at each run's start, per-run noise in dynamic power and
    throughput, a power cap at TDP (clocks throttle, the work's energy is kept), the idle decay and
    tail of :class:`GpuTwin`, and thermal drift: static power rises with a first-order temperature.
    """

    source = "simulated"
    driver = "simulated"

    def __init__(self, profile: HardwareProfile, seed: int = 0, gain: float | None = None,
                 params: SimParams | None = None):
        self.profile = profile
        self.params = params or SimParams()
        self.rng = np.random.default_rng(seed)
        self.effects = SensorEffects.realistic(self.rng)
        if gain is not None:
            self.effects.gain = float(gain)
        self.twin = GpuTwin(profile)
        self.name = f"simulated {profile.name}"
        self.tdp_w = profile.tdp_w
        self.n_sm = self.params.n_sm
        self.t = 0.0
        self.trace = PowerTrace(-3600.0, profile.idle_power_w)
        sp = self.params
        self.theta_idle = sp.ambient_c + sp.thermal_k_per_w * profile.idle_power_w
        self.theta_ref = sp.ambient_c + sp.thermal_k_per_w * sp.reference_load * profile.tdp_w
        self.theta = self.theta_idle
        self._pub = np.array([-2.0])
        self.static_seen_w: list[float] = []  # static power during each run (thermal drift), for reports

    # -- truth -------------------------------------------------------------------------------------
    @property
    def e_kv(self) -> float:
        return self.profile.kv_byte_j

    def truth(self) -> dict:
        """The TRUE coefficients, and as the board's counter sees them (times its gain)."""
        p = self.profile
        true = {"static_power_w": p.static_power_w, "energy_per_flop_j": p.energy_per_flop_j,
                "energy_per_byte_j": p.energy_per_byte_j, "energy_per_kv_byte_j": self.e_kv,
                "idle_power_w": p.idle_power_w}
        return {"true": true, "through_counter": {k: v * self.effects.gain for k, v in true.items()}}

    def _static(self, theta: float) -> float:
        return self.profile.static_power_w * (1.0 + self.params.leakage_per_k * (theta - self.theta_ref))

    # -- throughput model --------------------------------------------------------------------------
    def launch_time_s(self, spec: RunSpec) -> float:
        """Roofline-like time of one launch from the profile's peaks and the kernel's occupancy."""
        sp, p, w = self.params, self.profile, spec.work
        n_sm = sp.n_sm
        pf, bw = p.peak_flops, p.peak_bandwidth_bytes_s
        if spec.kernel in ("stream_sum", "stream_copy"):
            occ = min(1.0, spec.params["num_programs"] / (4 * n_sm)) ** 0.6
            t = w.total_bytes / (sp.stream_efficiency * bw * occ)
        elif spec.kernel == "compute":
            occ = min(1.0, spec.params["num_programs"] / n_sm)
            t = w.flops / (sp.compute_efficiency * pf * occ)
        elif spec.kernel == "intensity":
            progs = spec.params["num_programs"]
            t_f = w.flops / (sp.compute_efficiency * pf * min(1.0, progs / n_sm))
            t_b = w.total_bytes / (sp.stream_efficiency * bw * min(1.0, progs / (4 * n_sm)) ** 0.6)
            t = (t_f ** 3 + t_b ** 3) ** (1.0 / 3.0)  # a smooth roofline: slower near the ridge
        elif spec.kernel == "kv_gather":
            progs = spec.params["num_seqs"] * spec.params["num_kv_heads"]
            eff = sp.kv_efficiency[spec.params["order"]] * min(1.0, progs / (2 * n_sm)) ** 0.6
            t = w.total_bytes / (eff * bw)
        else:
            raise ValueError(f"unknown kernel {spec.kernel!r}")
        return t + sp.launch_overhead_s

    # -- counter -----------------------------------------------------------------------------------
    def _extend_publications(self, t_s: float) -> None:
        e = self.effects
        while self._pub[-1] < t_s + 1.0:
            n = 64
            periods = np.clip(self.rng.normal(e.publish_period_s, e.publish_jitter_s, n),
                              0.5 * e.publish_period_s, 1.5 * e.publish_period_s)
            self._pub = np.concatenate([self._pub, self._pub[-1] + np.cumsum(periods)])

    def polls(self, t0_s: float, t1_s: float) -> tuple[np.ndarray, np.ndarray]:
        """What a poller sampling the counter at ``poll_hz`` sees over ``[t0_s, t1_s]``."""
        self._extend_publications(t1_s)
        pt = poll_times(t0_s, t1_s, self.params.poll_hz, self.rng)
        period = self.effects.publish_period_s
        pubs = self._pub[(self._pub >= t0_s - 3 * period) & (self._pub <= t1_s + period)]
        values = self.effects.counter_values_j(self.trace, pubs)
        return pt, poll_counter(pubs, values, pt)

    # -- device API --------------------------------------------------------------------------------
    def idle(self, seconds: float) -> tuple[float, float, np.ndarray, np.ndarray]:
        t0 = self.t
        self.t += seconds
        self._cool(seconds)
        pt, pe = self.polls(t0, self.t)
        return t0, self.t, pt, pe

    def _cool(self, seconds: float) -> None:
        self.theta = self.theta_idle + (self.theta - self.theta_idle) * math.exp(-seconds / self.params.thermal_tau_s)

    def cooldown(self, seconds: float) -> None:
        self.t += seconds
        self._cool(seconds)

    def run(self, spec: RunSpec, seconds: float, rise_s: float) -> RawRun:
        sp, p, w = self.params, self.profile, spec.work
        rng = self.rng
        t_launch = self.launch_time_s(spec) * max(0.5, 1.0 + rng.normal(0.0, sp.run_speed_noise))
        dyn_j = (p.energy_per_flop_j * w.flops + p.energy_per_byte_j * w.dram_bytes + self.e_kv * w.kv_bytes)
        dyn_j *= max(0.5, 1.0 + rng.normal(0.0, sp.run_power_noise))
        theta0 = self.theta
        static0 = self._static(theta0)
        p_dyn = dyn_j / t_launch
        if static0 + p_dyn > p.tdp_w:  # power cap: clocks throttle until the run fits under TDP
            if p.tdp_w <= static0:
                raise WattprintError("the TRUE profile's static power exceeds its TDP")
            p_dyn = p.tdp_w - static0
            t_launch = dyn_j / p_dyn
        n = launches_needed(t_launch, seconds, rise_s)
        t0 = self.t
        done_t = t0 + np.cumsum(t_launch * np.clip(1.0 + rng.normal(0.0, sp.launch_jitter, n), 0.5, 1.5))
        t_end = float(done_t[-1])
        busy = t_end - t0
        theta_ss = sp.ambient_c + sp.thermal_k_per_w * (static0 + p_dyn)
        a = p_dyn + self._static(theta_ss)
        b_thermal = self._static(theta0) - self._static(theta_ss)  # static rises towards theta_ss
        b_rise = float(self.trace.power_at(t0)) - (p_dyn + static0)  # power lags at the start
        self.trace.append(t0, a, b_rise, sp.rise_tau_s, b_thermal, sp.thermal_tau_s)
        self.theta = theta_ss + (theta0 - theta_ss) * math.exp(-busy / sp.thermal_tau_s)
        static_end = self._static(self.theta)
        self.static_seen_w.append(0.5 * (static0 + static_end))
        tail = self.twin.tail_fraction * p_dyn
        self.trace.append(t_end, p.idle_power_w, static_end - p.idle_power_w, self.twin.idle_tau_s,
                          tail, self.twin.tail_tau_s)
        settle = 0.3  # the counter publishes up to ~100 ms late: poll a little past the end
        self.t = t_end + settle
        self._cool(settle)
        pt, pe = self.polls(t0 - 0.5, self.t)
        return RawRun(spec, t0, done_t, np.arange(1, n + 1), pt, pe)

    def close(self) -> None:
        pass


# ======================================================================================= GPU device
class GpuDevice:
    """A real GPU: the kernels launched with torch/triton, energy from :class:`NvmlMeter` polled by a
    sampler thread. Opening it raises :class:`MeterError` (or ImportError) when anything is missing."""

    source = "nvml"

    def __init__(self, index: int, poll_hz: float = 500.0, seed: int = 0, *, meter=None, torch_device=None):
        """Open GPU ``index`` (an NVML index; the CUDA device with the same UUID runs the kernels).

        For tests: ``meter`` replaces the NVML meter and ``torch_device`` (e.g. ``"cpu"`` with
        ``TRITON_INTERPRET=1``) runs the kernels there, skipping the CUDA and NVML queries.
        """
        if meter is None:
            from wattprint.profiler.meters.nvml import NvmlMeter  # lazy: only this path needs NVML

            meter = NvmlMeter(devices=[index])
        self.meter = meter
        try:
            info = self.meter.devices[0]
            try:
                import torch
            except ImportError as exc:
                raise MeterError(f"calibrating a GPU needs torch with CUDA: {exc}") from exc
            from wattprint.kernels import require_triton

            self.torch = torch
            self.name = info.name
            if torch_device is not None:
                require_triton()
                self.device = torch.device(torch_device)
                self._sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
                self.n_sm = 1
                self.driver = "none"
                self.tdp_w = float(info.extra.get("tdp_w", 1e9))
            else:
                if not torch.cuda.is_available():
                    raise MeterError("torch sees no CUDA device (a CPU-only torch build, or no driver)")
                require_triton()
                cuda_index = _cuda_index_for(torch, info.extra.get("uuid"), index)
                torch.cuda.set_device(cuda_index)
                self.device = torch.device("cuda", cuda_index)
                self._sync = torch.cuda.synchronize
                self.n_sm = int(torch.cuda.get_device_properties(cuda_index).multi_processor_count)
                self.driver = _nvml_driver_version()
                self.tdp_w = _nvml_power_limit_w(info.extra.get("uuid"), index)
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        except BaseException:
            self.meter.close()
            raise
        self.period_s = 1.0 / poll_hz
        self._lock = threading.Lock()
        self._t: list[float] = []
        self._e: list[float] = []
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="wattprint-calibrate-poller", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.meter.read()
            except MeterError as exc:
                self._error = exc
                return
            with self._lock:
                self._t.append(r.t_s)
                self._e.append(r.energy_j[0])
            time.sleep(self.period_s)

    def polls(self, t0_s: float, t1_s: float) -> tuple[np.ndarray, np.ndarray]:
        if self._error is not None:
            raise MeterError(f"reading the energy counter failed: {self._error}")
        with self._lock:
            t = np.asarray(self._t)
            e = np.asarray(self._e)
            keep = t >= time.monotonic() - 120.0  # the sampler's memory stays bounded
            self._t, self._e = list(t[keep]), list(e[keep])
        sel = (t >= t0_s) & (t <= t1_s)
        return t[sel], e[sel]

    def idle(self, seconds: float):
        t0 = time.monotonic()
        time.sleep(seconds)
        t1 = time.monotonic()
        pt, pe = self.polls(t0, t1)
        return t0, t1, pt, pe

    def cooldown(self, seconds: float) -> None:
        time.sleep(seconds)

    def run(self, spec: RunSpec, seconds: float, rise_s: float) -> RawRun:
        sync = self._sync
        launch, buffers = _make_launcher(spec, self.torch, self.device, self.generator)
        try:
            launch()  # compiles
            sync()
            t0 = time.monotonic()
            for _ in range(2):
                launch()
            sync()
            t_launch = (time.monotonic() - t0) / 2
            n = launches_needed(t_launch, seconds, rise_s)
            batch = max(1, min(n, int(0.05 / max(t_launch, 1e-9))))  # synchronise about every 50 ms
            done_t, done_n = [], []
            done = 0
            t_start = time.monotonic()
            t_min_end = t_start + rise_s + seconds  # the launch-time estimate from 2 launches can be off
            while done < n or time.monotonic() < t_min_end:
                k = min(batch, n - done) if done < n else batch
                for _ in range(k):
                    launch()
                sync()
                done += k
                done_t.append(time.monotonic())
                done_n.append(done)
        finally:
            buffers.clear()
            if self.device.type == "cuda":
                self.torch.cuda.empty_cache()
        time.sleep(0.3)  # let the counter publish past the end
        pt, pe = self.polls(t_start - 0.5, time.monotonic())
        return RawRun(spec, t_start, np.asarray(done_t), np.asarray(done_n), pt, pe)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.meter.close()


def _cuda_index_for(torch, uuid: str | None, fallback: int) -> int:
    """The CUDA device with NVML's UUID (CUDA and NVML may number GPUs differently)."""
    if uuid:
        want = uuid.removeprefix("GPU-").lower()
        for i in range(torch.cuda.device_count()):
            got = str(getattr(torch.cuda.get_device_properties(i), "uuid", "")).removeprefix("GPU-").lower()
            if got == want:
                return i
    return fallback


def _nvml_driver_version() -> str:
    try:
        import pynvml

        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - informative only
        return "unknown"


def _nvml_power_limit_w(uuid: str | None, index: int) -> float:
    import pynvml

    try:
        h = pynvml.nvmlDeviceGetHandleByUUID(uuid) if uuid else pynvml.nvmlDeviceGetHandleByIndex(index)
        try:
            return pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0
        except pynvml.NVMLError:
            return pynvml.nvmlDeviceGetPowerManagementDefaultLimit(h) / 1000.0
    except pynvml.NVMLError as exc:
        raise MeterError(f"cannot read the GPU's power limit through NVML: {exc}") from exc


def _make_launcher(spec: RunSpec, torch, dev, gen):
    """A no-argument function launching the run's kernel once on torch device ``dev``, and the dict
    holding its buffers (cleared to free them)."""
    from wattprint.kernels import compute, intensity, kv_gather, stream

    p = spec.params
    b: dict = {}
    bf16 = torch.bfloat16
    if spec.kernel == "stream_sum":
        b["x"] = torch.rand(p["n_elements"], device=dev, generator=gen)
        b["partial"] = torch.empty(p["num_programs"], device=dev)
        return (lambda: stream.stream_sum(b["x"], p["num_programs"], p["block"], partial=b["partial"],
                                          reduce=False)), b
    if spec.kernel == "stream_copy":
        b["x"] = torch.rand(p["n_elements"], device=dev, generator=gen).to(bf16)
        b["y"] = torch.empty_like(b["x"])
        return (lambda: stream.stream_copy(b["x"], b["y"], p["num_programs"], p["block"])), b
    if spec.kernel == "compute":
        P, bm, bn, bk = p["num_programs"], p["bm"], p["bn"], p["bk"]
        b["a"] = (torch.rand((P, bm, bk), device=dev, generator=gen) * 0.01).to(bf16)
        b["b"] = (torch.rand((P, bk, bn), device=dev, generator=gen) * 0.01).to(bf16)
        b["out"] = torch.empty((P, bm, bn), device=dev)
        return (lambda: compute.compute_dot(b["a"], b["b"], p["repeats"], out=b["out"])), b
    if spec.kernel == "intensity":
        bm, bn, bk = p["bm"], p["bn"], p["bk"]
        b["a"] = (torch.rand((p["n_tiles"], bm, bk), device=dev, generator=gen) * 0.01).to(bf16)
        b["w"] = (torch.rand((bk, bn), device=dev, generator=gen) * 0.01).to(bf16)
        b["out"] = torch.empty((p["num_programs"], bm, bn), device=dev)
        return (lambda: intensity.intensity_dot(b["a"], b["w"], p["repeats"], p["num_programs"],
                                                out=b["out"])), b
    if spec.kernel == "kv_gather":
        bs, kvh, hs, nh, ns, ctx = (p["block_size"], p["num_kv_heads"], p["head_size"], p["num_heads"],
                                    p["num_seqs"], p["context"])
        lens = [ctx] * ns
        table, used = kv_gather.make_block_table(lens, bs, order=p["order"],
                                                 generator=torch.Generator().manual_seed(ns * ctx))
        kv = kv_gather.allocate_vllm_kv_cache(used, bs, kvh, hs, bf16, dev)
        kv.normal_(generator=gen)
        b["kv"] = kv
        b["k"], b["v"] = kv_gather.split_vllm_kv_cache(kv, hs)
        b["q"] = torch.randn((ns, nh, hs), device=dev, generator=gen).to(bf16)
        b["table"] = table.to(dev)
        b["lens"] = torch.tensor(lens, dtype=torch.int32, device=dev)
        b["out"] = torch.empty((ns, nh, hs), device=dev)
        return (lambda: kv_gather.paged_decode_attention(b["q"], b["k"], b["v"], b["table"], b["lens"],
                                                         out=b["out"])), b
    raise ValueError(f"unknown kernel {spec.kernel!r}")


# ======================================================================================= the driver
@dataclass
class CalibrationResult:
    profile: HardwareProfile
    fit: FitResult
    runs: list[RunResult]
    idle_power_w: float
    truth: dict | None = None  # simulated runs only: the TRUE coefficients, raw and through the counter


def calibrate(device, *, seconds: float = DEFAULT_SECONDS, trials: int = 2, seed: int = 0,
              rise_s: float | None = None, cooldown_s: float | None = None, idle_s: float | None = None,
              name: str | None = None, meter: str = "", device_index: int = 0, progress=None,
              plan: list[RunSpec] | None = None) -> CalibrationResult:
    """Run the whole procedure on ``device`` (:class:`SimulatedDevice` or :class:`GpuDevice`).

    ``seconds`` is the measured part of each run; the cool-down after it (default ``seconds``) and
    the idle window (default ``2·seconds``) scale with it. The rise time discarded before it is a
    property of the GPU, not of the run: :data:`DEFAULT_RISE_S` unless given. ``progress(label, done,
    total)`` is called after each step.
    """
    if seconds <= 0:
        raise ValueError("--seconds must be positive")
    rise_s = DEFAULT_RISE_S if rise_s is None else rise_s
    cooldown_s = seconds if cooldown_s is None else cooldown_s
    idle_s = 2.0 * seconds if idle_s is None else idle_s
    rng = np.random.default_rng(seed)
    plan = build_plan(device.n_sm, trials, rng) if plan is None else plan
    total = len(plan) + 1

    t0, t1, pt, pe = device.idle(idle_s)
    ta, tb, idle_j = counter_window(pt, pe, t0, t1)
    idle_w = idle_j / (tb - ta)
    if progress:
        progress(f"idle power {idle_w:.1f} W", 1, total)
    runs = []
    for i, spec in enumerate(plan):
        raw = device.run(spec, seconds, rise_s)
        runs.append(analyse_run(raw, rise_s, device.tdp_w))
        device.cooldown(cooldown_s)
        if progress:
            progress(spec.label, i + 2, total)
    fit = fit_energy_model(runs)

    warnings = []
    coef = {}
    for key in COEFFICIENTS:
        v = fit.get(key)
        if v is not None and v < 0:
            warnings.append(f"{key} fitted negative ({v:.3g}); written as 0")
            v = 0.0
        coef[key] = v
    if coef["static_power_w"] is None:
        raise WattprintError("no run measured static power")
    peak_flops = max((r.flops / r.duration_s for r in runs), default=0.0)
    peak_bw = max(((r.dram_bytes + r.kv_bytes) / r.duration_s for r in runs if r.spec.kernel.startswith("stream")),
                  default=0.0)
    truth = device.truth() if hasattr(device, "truth") else None
    fit_section = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.name,
        "device_index": device_index,
        "driver": device.driver,
        "meter": meter or device.source,
        "source": device.source,
        "model": "E = static_power_w*T + energy_per_flop_j*F + energy_per_byte_j*B + energy_per_kv_byte_j*K",
        "method": "weighted least squares (weights 1/E_hat^2), Student-t intervals",
        "runs": fit.n,
        "dof": fit.dof,
        "r2": _f(fit.r2),
        "rms_relative_residual": _f(fit.rms_relative_residual),
        "confidence": CONFIDENCE,
        "intervals": {k: [_f(v) for v in fit.interval(k)] for k in fit.names},
        "std_errors": {k: _f(fit.std_error[i]) for i, k in enumerate(fit.names)},
        "runs_near_power_limit": sum(r.near_power_limit for r in runs),
        "seconds_per_run": seconds,
        "rise_s": rise_s,
        "cooldown_s": cooldown_s,
        "idle_window_s": idle_s,
        "trials": trials,
        "seed": seed,
        "peaks": "highest throughput achieved by the calibration kernels (not datasheet figures)",
        "counter_gain": "not corrected: coefficients are in the board counter's joules (sensor gain +-5 %)",
    }
    if warnings:
        fit_section["warnings"] = warnings
    if truth is not None:
        sim = {"true_profile": device.profile.name, "sensor_gain": _f(device.effects.gain),
               "true_coefficients": {k: _f(v) for k, v in truth["true"].items()},
               "static_power_range_w": [_f(min(device.static_seen_w)), _f(max(device.static_seen_w))]}
        fit_section["simulation"] = sim
    profile = HardwareProfile(
        name=name or _slug(device.name),
        tdp_w=float(device.tdp_w),
        idle_power_w=_f(idle_w),
        static_power_w=_f(coef["static_power_w"]),
        energy_per_flop_j=_f(coef["energy_per_flop_j"] or 0.0),
        energy_per_byte_j=_f(coef["energy_per_byte_j"] or 0.0),
        peak_flops=_f(peak_flops),
        peak_bandwidth_bytes_s=_f(peak_bw),
        energy_per_kv_byte_j=None if coef["energy_per_kv_byte_j"] is None else _f(coef["energy_per_kv_byte_j"]),
        fit=fit_section,
    )
    return CalibrationResult(profile, fit, runs, idle_w, truth)


def _f(v) -> float:
    return float(f"{float(v):.6g}")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def write_profile(profile: HardwareProfile, out: Path, header: str = "") -> None:
    """:func:`save_profile`, and on any interruption remove its temporary file too."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_profile(profile, out, header)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ============================================================================================= CLI
def add_calibrate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``wattprint calibrate``."""
    parser.add_argument("--device", type=int, default=0, metavar="N", help="NVML index of the GPU (default 0)")
    parser.add_argument("--meter", choices=("nvml", "simulated"), default="nvml",
                        help="nvml: run the kernels on the GPU; simulated: a simulated GPU, nothing runs")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, metavar="S",
                        help="measured seconds per run (default 5); the cool-down is S and the idle window 2*S")
    parser.add_argument("--rise-seconds", type=float, default=DEFAULT_RISE_S, metavar="R",
                        help=f"start of each run discarded as rise time (default {DEFAULT_RISE_S:g})")
    parser.add_argument("--trials", type=int, default=2, help="repetitions of each configuration (default 2)")
    parser.add_argument("--simulate", metavar="TRUE.yaml", default=None,
                        help=f"TRUE profile of the simulated GPU (path or shipped name; default {DEFAULT_SIM_PROFILE})")
    parser.add_argument("--sensor-gain", type=float, default=None,
                        help="simulated counter's gain (default: drawn in [0.96, 1.04] from the seed)")
    parser.add_argument("--seed", type=int, default=0, help="run order and simulation noise (default 0)")
    parser.add_argument("--name", default=None, help="profile name (default: from the device name)")
    parser.add_argument("--out", required=True, metavar="PROFILE.yaml", help="where to write the profile")
    return parser


def run_calibrate(args: argparse.Namespace) -> int:
    """``wattprint calibrate``. Returns the exit code: 0, 2 on a usage/meter error, 130 on Ctrl-C."""
    from rich.console import Console

    console = Console()
    err = Console(stderr=True)
    out = Path(args.out)
    device = None
    try:
        if args.seconds <= 0 or args.trials <= 0 or args.rise_seconds < 0:
            err.print("[red]error:[/] --seconds and --trials must be positive, --rise-seconds not negative")
            return 2
        if not out.parent.is_dir():
            err.print(f"[red]error:[/] the directory of --out does not exist: {out.parent}")
            return 2
        if args.meter == "simulated":
            true = load_profile(args.simulate or DEFAULT_SIM_PROFILE)
            device = SimulatedDevice(true, seed=args.seed, gain=args.sensor_gain)
        else:
            if args.simulate or args.sensor_gain is not None:
                err.print("[red]error:[/] --simulate and --sensor-gain need --meter simulated")
                return 2
            try:
                device = GpuDevice(args.device, seed=args.seed)
            except (MeterError, ImportError) as exc:
                err.print(f"[red]error:[/] cannot calibrate GPU {args.device} with NVML: {exc}\n"
                          "Calibration needs an NVIDIA GPU with a working driver, CUDA torch and triton; "
                          "use --meter simulated to try the procedure without one.")
                return 2
        result = _calibrate_with_progress(device, args, console)
        header = (f"# Calibrated by `wattprint calibrate --meter {args.meter}` on {result.profile.fit['date']}"
                  + (" (SIMULATED: not a measurement)" if args.meter == "simulated" else ""))
        write_profile(result.profile, out, header)
        print_summary(console, result, out)
        return 0
    except KeyboardInterrupt:
        err.print("[yellow]interrupted:[/] no profile written")
        return 130
    except (WattprintError, ValueError) as exc:
        err.print(f"[red]error:[/] {exc}")
        return 2
    finally:
        if device is not None:
            device.close()


def _calibrate_with_progress(device, args, console) -> CalibrationResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]calibrate[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("idle power", total=None)

        def progress(label, done, total):
            bar.update(task, description=label, completed=done, total=total)

        return calibrate(device, seconds=args.seconds, trials=args.trials, seed=args.seed, name=args.name,
                         rise_s=args.rise_seconds,
                         meter=args.meter, device_index=args.device, progress=progress)


def print_summary(console, result: CalibrationResult, out: Path | None = None) -> None:
    from rich.table import Table

    fit, prof = result.fit, result.profile
    table = Table(title=f"calibration of {prof.fit['device']} ({prof.fit['source']})")
    table.add_column("coefficient", no_wrap=True)
    table.add_column("estimate", justify="right", no_wrap=True)
    table.add_column("95 % CI", justify="right", no_wrap=True)
    if result.truth:
        table.add_column("truth × gain", justify="right", no_wrap=True)
        table.add_column("error", justify="right", no_wrap=True)
    for i, key in enumerate(fit.names):
        est = float(fit.estimate[i])
        lo, hi = fit.interval(key)
        row = [key, f"{est:.4g}", f"± {100 * (hi - lo) / 2 / abs(est):.2f} %" if est else "-"]
        if result.truth:
            t = result.truth["through_counter"][key]
            row += [f"{t:.4g}", f"{100 * (est / t - 1):+.2f} %"]
        table.add_row(*row)
    idle_row = ["idle_power_w", f"{result.idle_power_w:.4g}", "-"]
    if result.truth:
        t = result.truth["through_counter"]["idle_power_w"]
        idle_row += [f"{t:.4g}", f"{100 * (result.idle_power_w / t - 1):+.2f} %"]
    table.add_row(*idle_row)
    console.print(table)
    console.print(f"R² {fit.r2:.5f} over {fit.n} runs ({fit.dof} dof); rms relative residual "
                  f"{100 * fit.rms_relative_residual:.2f} %; peaks achieved {prof.peak_flops / 1e12:.0f} TFLOP/s, "
                  f"{prof.peak_bandwidth_bytes_s / 1e12:.2f} TB/s"
                  + (f"; simulated sensor gain {prof.fit['simulation']['sensor_gain']}" if result.truth else ""))
    near = prof.fit["runs_near_power_limit"]
    if near:
        console.print(f"{near} run(s) averaged ≥ {NEAR_LIMIT_FRACTION:.0%} of the power limit (see docs/calibration.md)")
    for w in prof.fit.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")
    if out is not None:
        console.print(f"profile written to {out}")


def main(argv=None) -> int:  # pragma: no cover - `wattprint calibrate` is the entry point
    parser = add_calibrate_arguments(argparse.ArgumentParser(prog="wattprint calibrate"))
    return run_calibrate(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = [
    "CalibrationResult", "FitResult", "GpuDevice", "RawRun", "RunResult", "RunSpec", "SimParams", "SimulatedDevice",
    "add_calibrate_arguments", "analyse_run", "build_plan", "calibrate", "counter_window", "fit_energy_model",
    "launches_needed", "run_calibrate", "student_t_quantile",
]
