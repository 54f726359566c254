"""The calibration procedure, from idle power to a hardware profile (``docs/calibration.md``).

1. Idle power over a quiet window.
2. A plan of runs (:mod:`~wattprint.profiler.calibrate.plan`): the four calibration kernels at several
   sizes, occupancies, intensities, context lengths and page orders, each repeated ``trials`` times, in
   random order.
3. Each run launches its kernel back to back for at least ``seconds`` after the rise time (and at
   least 32 launches unless they would take more than four times as long), polling the energy counter
   meanwhile; a cool-down follows.
4. Each run's energy is taken between two republications of the counter
   (:mod:`~wattprint.profiler.calibrate.analysis`).
5. Weighted least squares over the runs (:mod:`~wattprint.profiler.calibrate.fit`) gives the
   coefficients with 95 % confidence intervals (Student t) and R².
6. The result is a :class:`~wattprint.profiler.core.hardware.HardwareProfile` whose ``fit`` section
   records how it was obtained; ``save_profile`` writes it atomically.

The device is a :class:`~wattprint.profiler.calibrate.simdevice.SimulatedDevice` or a
:class:`~wattprint.profiler.calibrate.gpudevice.GpuDevice`: the same plan and analysis run on both.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass

import numpy as np

from wattprint.errors import WattprintError
from wattprint.profiler.calibrate.analysis import RunResult, analyse_run, counter_window
from wattprint.profiler.calibrate.fit import COEFFICIENTS, CONFIDENCE, FitResult, fit_energy_model
from wattprint.profiler.calibrate.plan import DEFAULT_RISE_S, DEFAULT_SECONDS, RunSpec, build_plan
from wattprint.profiler.core.hardware import HardwareProfile


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
    settings = {"seconds_per_run": seconds, "rise_s": rise_s, "cooldown_s": cooldown_s, "idle_window_s": idle_s,
                "trials": trials, "seed": seed}
    fit_section = _fit_section(device, fit, runs, meter, device_index, settings, warnings, truth)
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


def _fit_section(device, fit: FitResult, runs: list[RunResult], meter: str, device_index: int,
                 settings: dict, warnings: list[str], truth: dict | None) -> dict:
    """The profile's ``fit`` section: how the coefficients were obtained and how well they fit."""
    section = {
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
        **settings,
        "peaks": "highest throughput achieved by the calibration kernels (not datasheet figures)",
        "counter_gain": "not corrected: coefficients are in the board counter's joules (sensor gain +-5 %)",
    }
    if warnings:
        section["warnings"] = warnings
    if truth is not None:
        section["simulation"] = {
            "true_profile": device.profile.name, "sensor_gain": _f(device.effects.gain),
            "true_coefficients": {k: _f(v) for k, v in truth["true"].items()},
            "static_power_range_w": [_f(min(device.static_seen_w)), _f(max(device.static_seen_w))]}
    return section


def _f(v) -> float:
    return float(f"{float(v):.6g}")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"
