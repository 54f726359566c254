"""Cumulative totals of the sidecar's attributors: summed (an engine's attributor ends, its model's totals
carry on) and placed on the meter's device indices (each attributor sees only its session's devices)."""

from __future__ import annotations

from wattprint.profiler.core.results import Totals


def _add_nested(x: dict, y: dict) -> dict:
    out = {k: dict(v) for k, v in x.items()}
    for k, v in y.items():
        d = out.setdefault(k, {})
        for kk, vv in v.items():
            d[kk] = d.get(kk, 0.0) + vv
    return out


def _add_flat(x: dict, y: dict) -> dict:
    out = dict(x)
    for k, v in y.items():
        out[k] = out.get(k, 0.0) + v
    return out


def add_totals(a: Totals, b: Totals) -> Totals:
    """Elementwise sum of two cumulative totals (``b``'s source and coefficients win)."""
    n = max(len(a.device_measured_j), len(b.device_measured_j))
    dev = [
        (a.device_measured_j[i] if i < len(a.device_measured_j) else 0.0)
        + (b.device_measured_j[i] if i < len(b.device_measured_j) else 0.0)
        for i in range(n)
    ]
    starts = [t for t in (a.t_start, b.t_start) if t is not None]
    ends = [t for t in (a.t_end, b.t_end) if t is not None]
    return Totals(
        measured_j=a.measured_j + b.measured_j,
        attributed_j=a.attributed_j + b.attributed_j,
        idle_j=a.idle_j + b.idle_j,
        source=b.source or a.source,
        t_start=min(starts) if starts else None,
        t_end=max(ends) if ends else None,
        prefill_j=a.prefill_j + b.prefill_j,
        decode_j=a.decode_j + b.decode_j,
        kv_j=a.kv_j + b.kv_j,
        requests=a.requests + b.requests,
        steps=a.steps + b.steps,
        device_measured_j=dev,
        coefficients=dict(b.coefficients or a.coefficients),
        energy_j_by_phase_stratum=_add_nested(a.energy_j_by_phase_stratum, b.energy_j_by_phase_stratum),
        kv_j_by_stratum=_add_flat(a.kv_j_by_stratum, b.kv_j_by_stratum),
        tokens_by_phase_stratum=_add_nested(a.tokens_by_phase_stratum, b.tokens_by_phase_stratum),
        kv_read_bytes=a.kv_read_bytes + b.kv_read_bytes,
        kv_write_bytes=a.kv_write_bytes + b.kv_write_bytes,
        extrapolated_j=a.extrapolated_j + b.extrapolated_j,
        compute_j=a.compute_j + b.compute_j,
        weights_j=a.weights_j + b.weights_j,
        static_j=a.static_j + b.static_j,
    )


def on_devices(t: Totals, devices: tuple[int, ...], n_devices: int) -> Totals:
    """``t`` with its per-device joules moved from the attributor's device order to the meter's indices."""
    if list(devices) == list(range(len(t.device_measured_j))) and len(devices) == n_devices:
        return t
    dev = [0.0] * max(n_devices, max(devices, default=-1) + 1)
    for i, d in enumerate(devices):
        if i < len(t.device_measured_j):
            dev[d] += t.device_measured_j[i]
    t.device_measured_j = dev
    return t
