"""Calibration's simulated GPU: analytic work -> throughput -> power trace -> NVML-like counter.

Built on the twin's one power and counter model (:mod:`wattprint.profiler.twin.power`): no kernel runs
and no time passes. It offers the same device API as :class:`~wattprint.profiler.calibrate.gpudevice.GpuDevice`
(``idle``, ``run``, ``cooldown``, ``close``, ``n_sm``, ``tdp_w``, ``name``, ``driver``, ``source``) and
also ``truth()``: the TRUE coefficients it was built with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from wattprint.errors import WattprintError
from wattprint.profiler.calibrate.analysis import RawRun
from wattprint.profiler.calibrate.plan import RunSpec, launches_needed
from wattprint.profiler.core.hardware import HardwareProfile
from wattprint.profiler.twin.power import SOURCE, GpuTwin, PowerTrace, SensorEffects, poll_counter, poll_times


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

    source = SOURCE
    driver = SOURCE

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
