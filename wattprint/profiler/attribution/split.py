"""The split of each step's energy between its requests and into components (the public convention,
docs/attribution.md).

v1 (unchanged): request r's share of a step's energy E is ``E·d_r/Σd`` with
``d_r = e_flop·F_r + e_byte·KV_r + e_byte·W·T_r/T_step``.

v2 components of that share: the step's static energy S (fitted static power × duration, at most E)
is shared by ``d_r/Σd``; the dynamic rest ``E − S`` is shared in proportion to each predicted dynamic
part, so ``compute_j = (E−S)/Σd · e_flop·F_r``, ``kv_j = (E−S)/Σd · e_byte·KV_r`` (the KV traffic's own
dynamic energy, scaled by the step's measured-to-predicted dynamic ratio), ``weights_j = (E−S)/Σd ·
e_byte·W·T_r/T_step`` and ``static_j = S·d_r/Σd``; they add up to the v1 share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.core.costmodel import ModelGeometry


@dataclass
class EntrySplit:
    """Per request-step entry: energy share, its v2 components, and whether it counts as prefill."""

    energy: np.ndarray
    compute: np.ndarray
    weights: np.ndarray
    kv: np.ndarray
    static: np.ndarray
    is_prefill: np.ndarray


def split_steps(cols: StepColumns, g: ModelGeometry, step_energy: np.ndarray, step_static: np.ndarray,
                e_flop_step: np.ndarray, e_byte: float) -> EntrySplit:
    """Split each step's energy between its entries (v1) and into components (v2).

    Every joule given to a step reaches its entries: a step whose entries' predicted costs are all 0
    (a degenerate fit) is split by new tokens (by entry where it has none); its dynamic rest is then
    counted as compute.
    """
    so = cols.step_of
    n_steps = len(cols.t_start)
    new = cols.prefill + cols.decode
    # predicted dynamic parts, built in place (1-2 M entries: every temporary counts)
    compute = e_flop_step[so]
    compute *= cols.flops
    kv = cols.kv_read + cols.kv_write
    kv *= e_byte
    with np.errstate(divide="ignore", invalid="ignore"):
        w_per_token = np.where(cols.step_tokens > 0, e_byte * g.weight_bytes / cols.step_tokens, 0.0)
    weights = w_per_token[so]
    weights *= new
    d = compute + kv
    d += weights
    dsum = np.bincount(so, d, minlength=n_steps)
    ok = dsum > 0
    static = np.minimum(step_static, step_energy)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(ok, 1.0 / dsum, 0.0)
    per_dyn = ((step_energy - static) * inv)[so]  # dynamic joules per unit of d
    compute *= per_dyn
    kv *= per_dyn
    weights *= per_dyn
    energy = (step_energy * inv)[so]
    energy *= d
    static_e = (static * inv)[so]
    static_e *= d
    out = EntrySplit(energy=energy, compute=compute, weights=weights, kv=kv, static=static_e,
                     is_prefill=cols.prefill > 0)
    if not ok.all():
        bad = ~ok[so]
        w = np.where(bad, np.where(cols.step_tokens[so] > 0, new, 1), 0).astype(float)
        wsum = np.bincount(so, w, minlength=n_steps)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(wsum > 0, 1.0 / wsum, 0.0)[so] * w
        out.static[bad] = (static[so] * frac)[bad]
        out.compute[bad] = ((step_energy - static)[so] * frac)[bad]
        out.energy[bad] = (step_energy[so] * frac)[bad]
    return out
