"""Checks of the energy counter itself: its update period, its energy against integrated instant power
under a matrix-multiply load, and idle power.

On a GPU everything goes through NVML (wattprint's :class:`NvmlGpu` calls), polled at the fastest rate a
Python loop reaches (≥ 1 kHz). On the simulated meter the same checks run against the twin's NVML-like
counter on a virtual clock (polls every millisecond of simulated time, no waiting), its instant power
being the twin's true power on the counter's scale.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from gpuval.probe import Probe
from wattprint.profiler.core.hardware import HardwareProfile
from wattprint.profiler.meters.simulated import SimulatedMeter
from wattprint.profiler.timeline.counter import change_points

POLL_HZ = 2000.0


def summarise(t, e_j, p_w, load: tuple[float, float]) -> dict:
    """Update period from the polls' change points; counter energy against ∫P dt between the first and
    last counter changes inside the ``load`` window; idle power outside it is not used here."""
    t, e_j, p_w = (np.asarray(x, dtype=float) for x in (t, e_j, p_w))
    tc, ec, _ = change_points(t, e_j)
    periods = np.diff(tc)
    out = {"poll_hz": float((len(t) - 1) / (t[-1] - t[0])) if len(t) > 1 else 0.0,
           "counter_changes": int(len(tc))}
    if len(periods):
        out.update(counter_period_s=float(np.median(periods)), counter_period_p10_s=float(np.percentile(periods, 10)),
                   counter_period_p90_s=float(np.percentile(periods, 90)))
    inside = np.flatnonzero((tc >= load[0]) & (tc <= load[1]))
    if len(inside) < 2:
        return out | {"counter_vs_power_err": None, "note": "fewer than two counter changes under load"}
    a, b = inside[0], inside[-1]
    e_counter = float(ec[b] - ec[a])
    grid = np.linspace(tc[a], tc[b], 20001)
    pg = np.interp(grid, t, p_w)
    e_power = float(np.sum(0.5 * (pg[1:] + pg[:-1]) * np.diff(grid)))  # trapezoid (numpy 1 and 2)
    return out | {"load_window_s": float(tc[b] - tc[a]), "counter_j": e_counter, "power_integral_j": e_power,
                  "load_power_w": e_counter / float(tc[b] - tc[a]),
                  "counter_vs_power_err": (e_counter - e_power) / e_power if e_power > 0 else None}


# ---------------------------------------------------------------------------------------------- NVML
def nvml_checks(probe: Probe, load_s: float = 10.0, idle_s: float = 5.0, size: int = 8192) -> dict:
    """Poll NVML's counter and instant power as fast as Python goes while a matmul load runs (bf16
    ``size``² products on ``probe.torch_device``)."""
    import torch

    device = torch.device(probe.torch_device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    gpu = probe.nvml_gpu
    try:
        gpu.power_instant_mw()
        power, power_field = gpu.power_instant_mw, "NVML_FI_DEV_POWER_INSTANT"
    except Exception:
        power, power_field = gpu.power_usage_mw, "nvmlDeviceGetPowerUsage (1 s average: not instant)"
    polls: list[tuple[float, float, float]] = []
    stop = threading.Event()

    def poll():  # paced at 2 kHz: fast enough for a ~100 ms counter, bounded memory and GIL use
        next_t = time.monotonic()
        while not stop.is_set():
            t = time.monotonic()
            polls.append((t, gpu.total_energy_mj() / 1000.0, power() / 1000.0))
            next_t = max(next_t + 1.0 / POLL_HZ, t)
            time.sleep(max(0.0, next_t - time.monotonic()))

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    time.sleep(idle_s)  # idle, then load
    t_load0 = time.monotonic()
    n = 0
    while time.monotonic() < t_load0 + load_s:
        for _ in range(20):
            a @ b
        sync()
        n += 20
    t_load1 = time.monotonic()
    time.sleep(0.5)
    stop.set()
    thread.join()
    t, e, p = (np.array(c) for c in zip(*polls))
    out = summarise(t, e, p, (t_load0 + 1.0, t_load1))  # the first second is the power ramp
    out.update(power_field=power_field, matmul_tflops=n * 2 * size ** 3 / (t_load1 - t_load0) / 1e12)
    idle = (t >= t[0] + 1.0) & (t <= t_load0)
    out["idle"] = _idle_from(t[idle], e[idle])
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _idle_from(t, e) -> dict:
    tc, ec, _ = change_points(t, e)
    if len(tc) < 2:
        return {"idle_power_w": None, "note": "the counter changed fewer than twice"}
    return {"idle_power_w": float((ec[-1] - ec[0]) / (tc[-1] - tc[0])), "window_s": float(tc[-1] - tc[0])}


# ----------------------------------------------------------------------------------------- simulated
def simulated_checks(profile: HardwareProfile, seed: int, load_s: float = 10.0, idle_s: float = 5.0) -> dict:
    """The same checks on the twin's counter, on a virtual clock (1 kHz polls of simulated time)."""
    clock = [1000.0]
    meter = SimulatedMeter(profile=profile, seed=seed, time_fn=lambda: clock[0])
    dev = meter._live[0]  # the twin's true power trace: this bench's view of the simulation
    gain = dev.effects.gain
    polls = []
    t_load0 = clock[0] + idle_s
    t_load1 = t_load0 + load_s
    span = 0.01  # the load reported in 10 ms kernels, as the GPU runs it: 70 % of peak FLOP/s
    next_obs = t_load0
    while clock[0] < t_load1 + 0.5:
        clock[0] += 1e-3
        while next_obs < min(clock[0], t_load1):
            meter.observe(next_obs, next_obs + span, 0.7 * profile.peak_flops * span,
                          0.05 * profile.peak_bandwidth_bytes_s * span)
            next_obs += span
        r = meter.read()
        polls.append((r.t_s, r.energy_j[0], float(dev.trace.power_at(r.t_s)) * gain))
    t, e, p = (np.array(c) for c in zip(*polls))
    out = summarise(t, e, p, (t_load0 + 1.0, t_load1))
    idle = (t >= t[0] + 0.5) & (t <= t_load0)
    out.update(power_field="twin true power x sensor gain", clock="virtual", idle=_idle_from(t[idle], e[idle]))
    return out
