"""The simulated GPU's power and its energy sensor (the twin's one power and counter model).

* :class:`PowerTrace` - true power over time as segments ``p(t) = a + b1·e^{-s/tau1} + b2·e^{-s/tau2}``
  (``s`` = time since the segment began), integrated exactly.
* :class:`SensorEffects` - how an NVML-like energy counter reports that trace: republished about every
  100 ms with jitter, a small internal latency, a board gain error of a few percent, millijoule
  quantisation (facts.md: NVML behaviour, Yang et al. SC'24).
* :class:`GpuTwin` turns activity (FLOPs, DRAM bytes, duration) into power the way an H100 behaves:
  static power while clocks are up, energy per FLOP that rises with utilisation, a power cap that
  stretches steps instead of exceeding TDP, and idle power that decays slowly after activity plus a
  fast tail of the last step's dynamic power.

Used by the simulated meter, the trace simulator and calibration's simulated device. Nothing it
reports is ever a measurement (source ``simulated``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wattprint.profiler.core.hardware import HardwareProfile

SOURCE = "simulated"


# --------------------------------------------------------------------------------------------- power
class PowerTrace:
    """Piecewise power, appended in time order; cumulative energy evaluated exactly (vectorised)."""

    def __init__(self, t0_s: float, power_w: float = 0.0):
        self._t0: list[float] = [t0_s]
        self._a: list[float] = [power_w]
        self._b1: list[float] = [0.0]
        self._tau1: list[float] = [1.0]
        self._b2: list[float] = [0.0]
        self._tau2: list[float] = [1.0]
        self._frozen = None

    @property
    def t_last_s(self) -> float:
        return self._t0[-1]

    def append(self, t0_s: float, a_w: float, b1_w: float = 0.0, tau1_s: float = 1.0,
               b2_w: float = 0.0, tau2_s: float = 1.0) -> None:
        """From ``t0_s`` on, power is ``a + b1·exp(-(t-t0)/tau1) + b2·exp(-(t-t0)/tau2)``."""
        if t0_s < self._t0[-1]:
            raise ValueError("PowerTrace segments must be appended in time order")
        self._t0.append(t0_s)
        self._a.append(a_w)
        self._b1.append(b1_w)
        self._tau1.append(tau1_s)
        self._b2.append(b2_w)
        self._tau2.append(tau2_s)
        self._frozen = None

    def _arrays(self):
        if self._frozen is None:
            t0 = np.asarray(self._t0)
            a, b1, b2 = np.asarray(self._a), np.asarray(self._b1), np.asarray(self._b2)
            tau1, tau2 = np.asarray(self._tau1), np.asarray(self._tau2)
            dur = np.diff(t0)
            seg = self._seg_energy(a[:-1], b1[:-1], tau1[:-1], b2[:-1], tau2[:-1], dur)
            cum = np.concatenate([[0.0], np.cumsum(seg)])
            self._frozen = (t0, a, b1, tau1, b2, tau2, cum)
        return self._frozen

    @staticmethod
    def _seg_energy(a, b1, tau1, b2, tau2, s):
        return a * s + b1 * tau1 * (1.0 - np.exp(-s / tau1)) + b2 * tau2 * (1.0 - np.exp(-s / tau2))

    def energy_until(self, t_s) -> np.ndarray:
        """Joules from the trace's start to each time in ``t_s`` (the last segment extends forever)."""
        t0, a, b1, tau1, b2, tau2, cum = self._arrays()
        t = np.asarray(t_s, dtype=float)
        i = np.clip(np.searchsorted(t0, t, side="right") - 1, 0, len(t0) - 1)
        s = np.maximum(t - t0[i], 0.0)
        return cum[i] + self._seg_energy(a[i], b1[i], tau1[i], b2[i], tau2[i], s)

    def power_at(self, t_s) -> np.ndarray:
        t0, a, b1, tau1, b2, tau2, _ = self._arrays()
        t = np.asarray(t_s, dtype=float)
        i = np.clip(np.searchsorted(t0, t, side="right") - 1, 0, len(t0) - 1)
        s = np.maximum(t - t0[i], 0.0)
        return a[i] + b1[i] * np.exp(-s / tau1[i]) + b2[i] * np.exp(-s / tau2[i])


# -------------------------------------------------------------------------------------------- sensor
@dataclass
class SensorEffects:
    """How an NVML-like counter reports true energy."""

    publish_period_s: float = 0.100  # republished about every 100 ms (facts.md)
    publish_jitter_s: float = 0.004  # std of each period
    latency_s: float = 0.002  # the published value is the energy up to (publish time - latency)
    gain: float = 1.0  # board gain error (a few percent, Yang et al.)
    quantum_j: float = 0.001  # millijoule counter

    @classmethod
    def realistic(cls, rng: np.random.Generator) -> SensorEffects:
        return cls(gain=float(rng.uniform(0.96, 1.04)), latency_s=float(rng.uniform(0.0, 0.004)))

    def publish_times(self, t_begin_s: float, t_end_s: float, rng: np.random.Generator) -> np.ndarray:
        n = int((t_end_s - t_begin_s) / self.publish_period_s) + 3
        periods = np.clip(rng.normal(self.publish_period_s, self.publish_jitter_s, n),
                          0.5 * self.publish_period_s, 1.5 * self.publish_period_s)
        start = t_begin_s - rng.uniform(0, self.publish_period_s)
        return start + np.concatenate([[0.0], np.cumsum(periods)])

    def counter_values_j(self, trace: PowerTrace, publish_times_s: np.ndarray) -> np.ndarray:
        """The cumulative counter value published at each publish time."""
        true_j = trace.energy_until(publish_times_s - self.latency_s)
        return np.floor(self.gain * true_j / self.quantum_j) * self.quantum_j


def poll_counter(publish_times_s: np.ndarray, values_j: np.ndarray, poll_times_s: np.ndarray) -> np.ndarray:
    """What a poller sees at each poll time: the last value published at or before it."""
    i = np.searchsorted(publish_times_s, poll_times_s, side="right") - 1
    return np.where(i >= 0, values_j[np.clip(i, 0, None)], values_j[0])


def poll_times(t_begin_s: float, t_end_s: float, rate_hz: float, rng: np.random.Generator) -> np.ndarray:
    """A sampler thread's poll times: a nominal period with a little scheduling jitter."""
    period = 1.0 / rate_hz
    n = int((t_end_s - t_begin_s) / period) + 1
    return t_begin_s + np.arange(n) * period + rng.uniform(0.0, 0.1 * period, n)


# ----------------------------------------------------------------------------------------------- GPU
@dataclass
class GpuTwin:
    """Activity -> power for one GPU, with H100-like effects.

    ``profile`` holds the true coefficients (static power, energy per FLOP at nominal utilisation,
    energy per byte, TDP, idle power, peaks, the fast tail after a step).
    """

    profile: HardwareProfile
    flop_util_slope: float = 0.4  # energy per FLOP = e_flop·(1 - slope/2 + slope·u), u = achieved/peak
    idle_tau_s: float = 2.5  # idle power decays slowly after activity
    # the last step's dynamic power fades over ~20 ms (not identifiable from the counter): the profile's
    # power_tail_fraction and power_tail_tau_s unless given
    tail_tau_s: float | None = None
    tail_fraction: float | None = None
    cap_exponent: float = 0.7  # a capped step stretches by (P_uncapped / TDP) ** exponent

    def __post_init__(self) -> None:
        if self.tail_tau_s is None:
            self.tail_tau_s = self.profile.power_tail_tau_s
        if self.tail_fraction is None:
            self.tail_fraction = self.profile.power_tail_fraction

    def energy_per_flop_j(self, utilisation):
        s = self.flop_util_slope
        return self.profile.energy_per_flop_j * (1.0 - s / 2.0 + s * np.asarray(utilisation))

    def step(self, flops: float, bytes_: float, duration_s: float):
        """One busy span. Returns (duration_s after any power-cap stretch, power_w, e_flop_j used)."""
        p = self.profile
        u = min(flops / (duration_s * p.peak_flops), 1.0) if duration_s > 0 else 0.0
        e_flop = float(self.energy_per_flop_j(u))
        dyn_j = e_flop * flops + p.energy_per_byte_j * bytes_
        power = p.static_power_w + dyn_j / duration_s
        if power > p.tdp_w:
            duration_s = duration_s * (power / p.tdp_w) ** self.cap_exponent
            power = p.tdp_w
        return duration_s, power, e_flop

    def append_busy(self, trace: PowerTrace, t_start_s: float, t_end_s: float, power_w: float) -> None:
        """A busy span at constant power, followed (until the next append) by the idle decay."""
        p = self.profile
        trace.append(t_start_s, power_w)
        tail = self.tail_fraction * max(power_w - p.static_power_w, 0.0)
        trace.append(t_end_s, p.idle_power_w, p.static_power_w - p.idle_power_w, self.idle_tau_s,
                     tail, self.tail_tau_s)
