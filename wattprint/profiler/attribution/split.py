"""The split of each step's energy between its requests (the public convention, docs/attribution.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.core.costmodel import ModelGeometry


@dataclass
class EntrySplit:
    """Per request-step entry: energy share, its KV part, and whether it counts as prefill."""

    energy: np.ndarray
    kv: np.ndarray
    is_prefill: np.ndarray


def split_steps(cols: StepColumns, g: ModelGeometry, step_energy: np.ndarray,
                e_flop_step: np.ndarray, e_byte: float) -> EntrySplit:
    """The v1 convention: a step's energy split by d_r / Σd.

    Every joule given to a step reaches its entries: a step whose entries' predicted costs are all 0
    (a degenerate fit) is split by new tokens (by entry where it has none).
    """
    so = cols.step_of
    kv_j = e_byte * (cols.kv_read + cols.kv_write)  # e_byte·(KV read + KV write)
    # d_r = e_flop·F + e_byte·KV + e_byte·W·T/T_step, built in place
    d = e_flop_step[so]
    d *= cols.flops
    d += kv_j
    d += (e_byte * g.weight_bytes / cols.step_tokens)[so] * (cols.prefill + cols.decode)
    dsum = np.bincount(so, d, minlength=len(cols.t_start))
    ok = dsum > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        per_d = np.where(ok, step_energy / dsum, 0.0)  # joules per unit of d, per step
    share = per_d[so] * d
    kv = per_d[so] * kv_j  # = share · e_byte·KV / d_r
    if not ok.all():
        bad = ~ok[so]
        new = (cols.prefill + cols.decode).astype(float)
        weight = np.where(cols.step_tokens[so] > 0, new, 1.0)
        wsum = np.bincount(so, np.where(bad, weight, 0.0), minlength=len(cols.t_start))
        with np.errstate(divide="ignore", invalid="ignore"):
            share[bad] = (step_energy / wsum)[so][bad] * weight[bad]
    return EntrySplit(share, kv, cols.prefill > 0)
