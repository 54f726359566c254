"""Efficiency classes A-G: model FLOPs per joule (``configs/efficiency.yaml``).

A use's class couples what it produced (the model FLOPs of its tokens, by the v1 cost model) with
what it consumed (its attributed joules). Pure functions over the shipped thresholds.
"""

from __future__ import annotations

from functools import lru_cache

import yaml

from wattprint.configs import config_dir


@lru_cache(maxsize=1)
def thresholds() -> tuple[tuple[str, float], ...]:
    """(class, minimum FLOPs per joule), best class first."""
    data = yaml.safe_load((config_dir() / "efficiency.yaml").read_text())
    pairs = [(str(k), float(v)) for k, v in data["classes"].items()]
    return tuple(sorted(pairs, key=lambda kv: -kv[1]))


def flops_per_j(flops: float, energy_j: float) -> float | None:
    return flops / energy_j if energy_j > 0 else None


def efficiency_class(flops: float, energy_j: float) -> str | None:
    """The class of ``flops`` model FLOPs delivered for ``energy_j`` joules (None without energy)."""
    f = flops_per_j(flops, energy_j)
    if f is None:
        return None
    for name, minimum in thresholds():
        if f >= minimum:
            return name
    return thresholds()[-1][0]
