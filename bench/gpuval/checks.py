"""The check that matters: each phase's energy measured in isolation against wattprint's attribution of
the mixed run, and the same for the energy a longer KV context costs.

Definitions (docs/gpu-validation.md):

* isolation, per phase: ``step_energy_j`` = counter energy over the run's window minus idle power over
  the (sub-millisecond) gaps between steps; ``j_per_token`` = that / tokens; ``net_j_per_token`` = the
  window's energy minus idle power over the whole window, / tokens (idle subtracted).
* mixed: wattprint's offline attribution of the mixed run with the calibrated profile as its prior;
  ``prefill_j``/``decode_j`` its totals, ``*_net_j`` the same less idle power over each phase's share of
  every step's duration.
* ``phase_err``: per phase, ``attributed / expected - 1`` on idle-subtracted energies, where
  ``expected`` splits the mixed run's attributed step energy in the proportion the isolated runs
  measured (the counter measures the total; attribution decides the split); the headline is the
  largest absolute value. ``phase_err_abs`` compares with the isolated joules directly (it adds the
  device's run-to-run variation, ``total_vs_isolation``).
"""

from __future__ import annotations

import numpy as np

from gpuval.runner import Run
from wattprint.commands.output import check_conservation
from wattprint.profiler.attribution.offline import Attribution, attribute
from wattprint.profiler.core.costmodel import ModelGeometry, kv_read_bytes, request_flops
from wattprint.profiler.core.hardware import HardwareProfile

PHASES = ("prefill", "decode")


def attribute_run(run: Run, g: ModelGeometry, hw: HardwareProfile) -> tuple[Attribution, float]:
    """wattprint's offline attribution of a run; conservation is checked (raises when violated)."""
    att = attribute(run.records, run.samples, g, hw, source=run.samples[0].source, model_name=g.name)
    return att, check_conservation(att.totals, att.requests)


def isolation(run: Run, prefill: bool, idle_w: float) -> dict:
    recs = run.records
    toks = sum(r.prefill_tokens if prefill else r.decode_tokens for s in recs for r in s.requests)
    step_j = run.energy_j - idle_w * run.gap_s
    out = {
        "steps": len(recs), "tokens": toks, "window_s": run.window_s, "busy_s": run.busy_s, "gap_s": run.gap_s,
        "energy_j": run.energy_j, "step_energy_j": step_j, "net_energy_j": run.energy_j - idle_w * run.window_s,
        "j_per_token": step_j / toks, "net_j_per_token": (run.energy_j - idle_w * run.window_s) / toks,
        "mean_power_w": run.energy_j / run.window_s,
        "mean_batch": float(np.mean([len(s.requests) for s in recs])),
        "mean_tokens_per_step": toks / len(recs),
        "mean_context": float(np.mean([r.context_tokens for s in recs for r in s.requests])),
    }
    out.update(zeus(run))
    return out


def zeus(run: Run) -> dict:
    if run.zeus_j is None:
        return {}
    # Zeus's window is the whole loop (its own clock); compare power, which does not depend on the edges
    ours_w = run.energy_j / run.window_s
    return {"zeus_j": run.zeus_j, "zeus_power_w": run.zeus_j / run.zeus_s,
            "zeus_vs_wattprint_power_err": (run.zeus_j / run.zeus_s) / ours_w - 1}


def _phase_net(att: Attribution, idle_w: float) -> dict[str, float]:
    parts = att.step_parts
    dt = parts["t_end"] - parts["t_start"]
    tot = parts["prefill_j"] + parts["decode_j"]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(tot > 0, parts["prefill_j"] / tot, 0.0)
    return {"prefill": att.totals.prefill_j - idle_w * float(np.sum(dt * share)),
            "decode": att.totals.decode_j - idle_w * float(np.sum(dt * (1.0 - share)))}


def mixed(run: Run, att: Attribution, conservation: float, iso: dict[str, dict], idle_w: float) -> dict:
    """Attribution of the mixed run against the isolated phases."""
    tot = att.totals
    attr = {"prefill": tot.prefill_j, "decode": tot.decode_j}
    attr_net = _phase_net(att, idle_w)
    iso_gross = {p: iso[p]["step_energy_j"] for p in PHASES}
    iso_net = {p: iso[p]["net_energy_j"] for p in PHASES}

    def errs(a: dict, ref: dict) -> tuple[dict, dict]:
        scale = sum(a.values()) / sum(ref.values())
        split = {p: a[p] / (ref[p] * scale) - 1 for p in PHASES}
        absolute = {p: a[p] / ref[p] - 1 for p in PHASES}
        return split, absolute

    split_net, abs_net = errs(attr_net, iso_net)
    split_gross, abs_gross = errs(attr, iso_gross)
    fit = att.fit[0]
    out = {
        "steps": len(run.records), "window_s": run.window_s, "busy_s": run.busy_s,
        "measured_j": tot.measured_j, "idle_j": tot.idle_j, "extrapolated_j": tot.extrapolated_j,
        "attributed_j": {p: attr[p] for p in PHASES}, "attributed_net_j": attr_net,
        "isolation_j": iso_gross, "isolation_net_j": iso_net,
        "total_vs_isolation": sum(attr.values()) / sum(iso_gross.values()) - 1,
        "phase_err": split_net, "phase_err_gross": split_gross,
        "phase_err_abs": abs_net, "phase_err_abs_gross": abs_gross,
        "conservation_error": conservation, "fit": {k: fit[k] for k in fit if isinstance(fit[k], (int, float, str))},
        "requests": len(att.requests),
    }
    out.update(zeus(run))
    return out


def kv(short: Run, long: Run, mix: Run, att: Attribution, g: ModelGeometry, hw: HardwareProfile, idle_w: float,
       batch: int, steps: int, contexts: tuple[int, int]) -> dict:
    """What a longer context costs a decode token: measured as the difference of two isolated runs at
    the same batch (short vs long contexts), and as wattprint splits a run holding both."""
    c0, c1 = contexts
    per = steps * batch  # request-steps in each isolated run
    e_s = short.energy_j - idle_w * short.gap_s
    e_l = long.energy_j - idle_w * long.gap_s
    m_iso = (e_l - e_s) / per
    by = {"L": [r for r in att.requests if r.id.startswith("L")], "S": [r for r in att.requests if r.id.startswith("S")]}
    half = steps * len(by["L"])
    m_attr = (sum(r.energy_j for r in by["L"]) - sum(r.energy_j for r in by["S"])) / half
    kv_attr = (sum(r.kv_j for r in by["L"]) - sum(r.kv_j for r in by["S"])) / half
    d_bytes = float(kv_read_bytes(g, c1) - kv_read_bytes(g, c0))
    d_flops = float(request_flops(g, 1, c1) - request_flops(g, 1, c0))
    # the KV traffic's own energy, measured: the extra energy less the static power of the extra time and
    # the attention FLOPs' energy (both from the calibrated profile, an independent measurement)
    kv_meas = m_iso - hw.static_power_w * (long.busy_s - short.busy_s) / per - hw.energy_per_flop_j * d_flops
    return {
        "batch": batch, "steps": steps, "contexts": [c0, c1], "extra_kv_bytes_per_token": d_bytes,
        "isolation_j": {"short": e_s, "long": e_l}, "busy_s": {"short": short.busy_s, "long": long.busy_s},
        "extra_j_per_token_isolation": m_iso, "extra_j_per_token_attributed": m_attr,
        "kv_err": m_attr / m_iso - 1 if m_iso > 0 else None,
        "j_per_kv_byte_isolation": m_iso / d_bytes,
        "kv_component_j_per_token_attributed": kv_attr, "kv_component_j_per_token_measured": kv_meas,
        "kv_component_err": kv_attr / kv_meas - 1 if kv_meas > 0 else None,
        "mixed_run_measured_j": att.totals.measured_j,
    }


def headline(mix: dict) -> float:
    return max(abs(v) for v in mix["phase_err"].values())
