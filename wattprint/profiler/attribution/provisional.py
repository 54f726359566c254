"""A request's provisional energy while it runs: what is settled, plus the fitted model's prediction for
its steps the counter has not covered yet (split between their requests by the same rule as settled
steps). Used at answer time, before the counter can know (issue 10: energy in every answer)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wattprint.profiler.attribution.coefficients import Coefficients
from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.attribution.settle import extrapolate_after
from wattprint.profiler.attribution.split import split_steps
from wattprint.profiler.core.costmodel import ModelGeometry


def predicted_parts(cols: StepColumns, slot: int, g: ModelGeometry, coefs: Sequence[Coefficients],
                    t_from: float) -> dict[str, float]:
    """The table fields (energy_j, prefill_j, decode_j and the components) the model predicts for request
    ``slot`` in the parts of the steps ``cols`` (with every entry of those steps) after ``t_from``."""
    energy = np.zeros(len(cols.t_start))
    static = np.zeros(len(cols.t_start))
    for coef in coefs:
        e, s = extrapolate_after(cols, coef, t_from)
        energy += e
        static += s
    e_flop = sum(coef.flop_energy_j(cols) for coef in coefs)
    e_byte = sum(coef.energy_per_byte_j for coef in coefs)
    split = split_steps(cols, g, energy, static, e_flop, e_byte)
    mine = cols.req == slot
    pre = float(split.energy[mine & split.is_prefill].sum())
    total = float(split.energy[mine].sum())
    return {"energy_j": total, "prefill_j": pre, "decode_j": total - pre, "kv_j": float(split.kv[mine].sum()),
            "compute_j": float(split.compute[mine].sum()), "weights_j": float(split.weights[mine].sum()),
            "static_j": float(split.static[mine].sum())}
