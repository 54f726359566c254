"""Calibration on the device under test: wattprint's procedure (as ``wattprint calibrate`` runs it), with
shorter runs so the whole validation fits its time budget, writing a hardware profile.

On a GPU: :class:`GpuDevice` (the Triton calibration kernels, NVML's counter). Simulated:
:class:`SimulatedDevice` built on the simulated engine's TRUE profile (virtual time: no waiting). The
profile written is the attribution's prior for the engine runs, as it would be in production.
"""

from __future__ import annotations

import time
from pathlib import Path

from wattprint.profiler.calibrate.procedure import calibrate
from wattprint.profiler.core.hardware import HardwareProfile, save_profile

#: seconds per run, rise time, cool-down, idle window, trials (the command's defaults: 5, 1, 5, 10, 2)
GPU_SETTINGS = {"seconds": 1.5, "rise_s": 0.5, "cooldown_s": 0.5, "idle_s": 3.0, "trials": 1}
SIM_SETTINGS = {"seconds": 2.0, "rise_s": 0.5, "cooldown_s": 1.0, "idle_s": 4.0, "trials": 2}


def run_calibration(kind: str, out_dir: Path, *, true_profile: HardwareProfile | None = None, device_index: int = 0,
                    seed: int = 0) -> tuple[dict, HardwareProfile | None]:
    """Calibrate and write ``out_dir/calibrated.yaml``. Returns (report section, profile or None)."""
    t0 = time.monotonic()
    settings = GPU_SETTINGS if kind == "nvml" else SIM_SETTINGS
    device = None
    try:
        if kind == "nvml":
            from wattprint.profiler.calibrate.gpudevice import GpuDevice

            device = GpuDevice(device_index, seed=seed)
        else:
            from wattprint.profiler.calibrate.simdevice import SimulatedDevice

            device = SimulatedDevice(true_profile, seed=seed)
        result = calibrate(device, seconds=settings["seconds"], trials=settings["trials"], seed=seed,
                           rise_s=settings["rise_s"], cooldown_s=settings["cooldown_s"], idle_s=settings["idle_s"],
                           meter=kind, device_index=device_index)
    except Exception as exc:  # reported, and the engine checks go on with a shipped profile
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "settings": settings,
                "duration_s": time.monotonic() - t0}, None
    finally:
        if device is not None:
            device.close()
    path = out_dir / "calibrated.yaml"
    header = (f"# Calibrated by bench/gpu_validate.py (wattprint's procedure, short runs) on "
              f"{result.profile.fit['date']}" + (" (SIMULATED: not a measurement)" if kind != "nvml" else ""))
    save_profile(result.profile, path, header)
    fit = result.fit
    section = {
        "status": "ok", "profile": str(path), "r2": fit.r2, "rms_relative_residual": fit.rms_relative_residual,
        "runs": fit.n, "idle_power_w": result.idle_power_w, "settings": settings,
        "coefficients": {k: float(fit.estimate[i]) for i, k in enumerate(fit.names)},
        "intervals_95": {k: list(fit.interval(k)) for k in fit.names},
        "runs_near_power_limit": result.profile.fit.get("runs_near_power_limit"),
        "warnings": result.profile.fit.get("warnings", []), "duration_s": time.monotonic() - t0,
    }
    if result.truth:
        tc = result.truth["through_counter"]
        section["truth_through_counter"] = tc
        section["error_vs_truth"] = {k: section["coefficients"][k] / tc[k] - 1 for k in fit.names if tc.get(k)}
    return section, result.profile
