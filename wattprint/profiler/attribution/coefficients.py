"""A device's energy model: coefficients, features and predictions per step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.core.hardware import HardwareProfile

COEF_NAMES = ("static_power_w", "energy_per_flop_j", "energy_per_flop_util_j", "energy_per_byte_j",
              "idle_power_w", "idle_decay_power_w", "cap_power_w")
#: the model's constants that are never fitted: always the hardware profile's
PROFILE_ONLY_NAMES = ("power_tail_fraction", "power_tail_tau_s")


@dataclass
class Coefficients:
    """A device's fitted energy model (per device: FLOPs and bytes are the whole step's)."""

    static_power_w: float
    energy_per_flop_j: float
    energy_per_flop_util_j: float
    energy_per_byte_j: float
    idle_power_w: float
    idle_decay_power_w: float
    #: what a step at the power cap draws, on the counter's scale: the cap (TDP) times the board's gain
    #: error, which the other coefficients absorb but a capped step's known energy would not
    cap_power_w: float
    tau_s: float
    tdp_w: float
    peak_flops: float  # per device
    n_devices: int = 1
    #: the fast tail in the gap after a step: this fraction of the step's dynamic power (above static),
    #: fading with this time constant; from the hardware profile, never fitted (a ~100 ms counter
    #: cannot resolve it)
    tail_fraction: float = 0.0
    tail_tau_s: float = 0.020

    @property
    def theta(self) -> np.ndarray:
        return np.array([getattr(self, n) for n in COEF_NAMES])

    def with_theta(self, theta: np.ndarray, tau_s: float | None = None) -> Coefficients:
        kw = dict(zip(COEF_NAMES, map(float, theta)))
        return Coefficients(**kw, tau_s=self.tau_s if tau_s is None else tau_s, tdp_w=self.tdp_w,
                            peak_flops=self.peak_flops, n_devices=self.n_devices,
                            tail_fraction=self.tail_fraction, tail_tau_s=self.tail_tau_s)

    def utilisation(self, flops: np.ndarray, dt: np.ndarray) -> np.ndarray:
        return np.clip(flops / (self.n_devices * np.maximum(dt, 1e-9) * self.peak_flops), 0.0, 1.0)

    def step_features(self, cols: StepColumns) -> np.ndarray:
        """[dt, F, F·u, B] per step."""
        dt = cols.dt
        u = self.utilisation(cols.step_flops, dt)
        return np.column_stack([dt, cols.step_flops, cols.step_flops * u, cols.step_bytes])

    def step_energy(self, cols: StepColumns, feats: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Predicted energy of each step on this device (never below 0, at most ``cap_power_w·dt``), and
        which steps hit the power cap."""
        feats = self.step_features(cols) if feats is None else feats
        raw = feats @ self.theta[:4]
        cap = self.cap_power_w * feats[:, 0]
        capped = raw > cap
        return np.clip(raw, 0.0, cap), capped

    def tail_power_w(self, cols: StepColumns, pred: np.ndarray) -> np.ndarray:
        """The power each step leaves behind as its fast tail: ``tail_fraction`` × its dynamic power
        (its predicted energy above static power × duration, per second)."""
        dt = cols.dt
        return self.tail_fraction * np.maximum(pred - self.static_power_w * dt, 0.0) / dt

    def flop_energy_j(self, cols: StepColumns) -> np.ndarray:
        """Effective energy per FLOP in each step (utilisation-dependent)."""
        u = self.utilisation(cols.step_flops, cols.dt)
        return np.maximum(self.energy_per_flop_j + self.energy_per_flop_util_j * u, 0.0)

    def as_dict(self) -> dict:
        d = {n: getattr(self, n) for n in COEF_NAMES}
        d["idle_decay_tau_s"] = self.tau_s
        d["power_tail_fraction"] = self.tail_fraction
        d["power_tail_tau_s"] = self.tail_tau_s
        return d


def prior_coefficients(hw: HardwareProfile, n_devices: int) -> Coefficients:
    """The hardware profile as a starting point (per device: a device sees 1/n of the step's work)."""
    return Coefficients(
        static_power_w=hw.static_power_w,
        energy_per_flop_j=hw.energy_per_flop_j / n_devices,
        energy_per_flop_util_j=0.0,
        energy_per_byte_j=hw.energy_per_byte_j / n_devices,
        idle_power_w=hw.idle_power_w,
        idle_decay_power_w=max(hw.static_power_w - hw.idle_power_w, 0.0),
        cap_power_w=hw.tdp_w,
        tau_s=2.0,
        tdp_w=hw.tdp_w,
        peak_flops=hw.peak_flops,
        n_devices=n_devices,
        tail_fraction=hw.power_tail_fraction,
        tail_tau_s=hw.power_tail_tau_s,
    )
