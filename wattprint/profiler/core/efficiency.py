"""Efficiency classes A-G: how close a request came to the best energy its work can cost on its hardware.

``efficiency = ideal_j / energy_j``, where ``ideal_j`` is the energy the request's work (its FLOPs, KV
bytes and tokens, by the v1 cost model) would cost at the model's best operating point on this hardware:
the calibrated coefficients of the hardware profile, a batch at the roofline ridge (the weights read once
per step are shared by as many tokens as keep the step compute-bound), static power only for the time
the work needs, and no idle. Pure functions; bands in ``configs/efficiency.yaml``; ``docs/efficiency.md``
explains the definition and its anchors.

Properties (tested): serving the same tokens with a larger model on the same hardware does not improve
the class (ideal and actual energy grow together); better batching improves it (actual energy falls, the
ideal does not move); classes are comparable between GPUs (each is graded against its own best point);
a request can be graded online from its own sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import yaml

from wattprint.configs import config_dir
from wattprint.profiler.core.costmodel import ModelGeometry
from wattprint.profiler.core.hardware import HardwareProfile


@dataclass(frozen=True)
class IdealCost:
    """The best-operating-point cost of work for one model on one kind of hardware (all devices of an
    instance together: per-device coefficients times the device count, for tensor parallelism)."""

    energy_per_flop_j: float
    energy_per_byte_j: float
    static_power_w: float
    peak_flops: float
    peak_bandwidth_bytes_s: float
    weight_bytes: float
    ridge_tokens: float  # tokens per step at which the step's FLOP time equals its weight-read time

    @classmethod
    def of(cls, g: ModelGeometry, hw: HardwareProfile, n_devices: int = 1) -> IdealCost:
        t_weights_s = g.weight_bytes / (hw.peak_bandwidth_bytes_s * n_devices)
        ridge = max(1.0, hw.peak_flops * n_devices * t_weights_s / (2.0 * (g.decoder_params + g.head_params)))
        return cls(hw.energy_per_flop_j, hw.energy_per_byte_j, hw.static_power_w * n_devices,
                   hw.peak_flops * n_devices, hw.peak_bandwidth_bytes_s * n_devices, float(g.weight_bytes), ridge)

    def energy_j(self, flops: float, kv_bytes: float, tokens: float) -> float:
        """Dynamic energy of the FLOPs and KV traffic, static power for the FLOP time, and the request's
        share (tokens / ridge batch) of reading the weights once, with static power for that read."""
        weights_j = (self.energy_per_byte_j * self.weight_bytes
                     + self.static_power_w * self.weight_bytes / self.peak_bandwidth_bytes_s)
        return (self.energy_per_flop_j * flops + self.energy_per_byte_j * kv_bytes
                + self.static_power_w * flops / self.peak_flops + weights_j * tokens / self.ridge_tokens)


@lru_cache(maxsize=1)
def bands() -> tuple[tuple[str, float], ...]:
    """(class, minimum efficiency), best class first (``configs/efficiency.yaml``)."""
    data = yaml.load((config_dir() / "efficiency.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    pairs = [(str(k), float(v)) for k, v in data["classes"].items()]
    return tuple(sorted(pairs, key=lambda kv: -kv[1]))


def efficiency(ideal_j: float | None, energy_j: float) -> float | None:
    """``ideal_j / energy_j`` (None without energy or an ideal)."""
    if ideal_j is None or not energy_j > 0:
        return None
    return ideal_j / energy_j


def efficiency_class(eff: float | None) -> str | None:
    """The band of an efficiency (None when there is none)."""
    if eff is None:
        return None
    for name, minimum in bands():
        if eff >= minimum:
            return name
    return bands()[-1][0]
