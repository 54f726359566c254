"""The validation's outputs: the JSON report, a markdown section, a console summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

from wattprint.files import atomic_write


def _clean(obj):
    """JSON-safe: NaN/inf become null, numpy scalars plain numbers, tuples lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, rep: dict) -> None:
    atomic_write(path, (json.dumps(_clean(rep), indent=2) + "\n").encode(), mode=0o600)


def zeus_summary(rep: dict) -> dict:
    """Zeus against wattprint's counter figure, window by window (power, so edges do not matter)."""
    errs = {}
    for policy, sec in rep.get("policies", {}).items():
        for name, part in list(sec["isolation"].items()) + [("mixed", sec["mixed"])]:
            if "zeus_vs_wattprint_power_err" in part:
                errs[f"{policy}-{name}"] = part["zeus_vs_wattprint_power_err"]
    if not errs:
        return {}
    return {"windows": errs, "max_abs_power_err": max(abs(v) for v in errs.values())}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:+.2f} %"


def _f(v, fmt: str = ".4g") -> str:
    return "n/a" if v is None else format(v, fmt)


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def section_markdown(rep: dict) -> str:
    dev, cal, kv = rep["device"], rep["calibration"], rep.get("kv", {})
    sim = dev["kind"] != "nvml"
    iso = lambda phase, key: _f(_get(rep, "isolation", phase, key))  # noqa: E731
    err = lambda part, phase: _pct(_get(rep, "mixed", part, phase))  # noqa: E731
    zeus = rep["zeus"]
    lines = [
        f"## GPU validation: {dev['name']}" + (" (SIMULATED: no measurement)" if sim else ""),
        "",
        f"{rep['date']} · `{rep['command']}` · driver {dev['driver']} · torch {rep['torch']} · "
        f"model {rep['model']['name']} · total {rep['timings_s']['total']:.0f} s",
        "",
        "| check | figure |",
        "|---|---|",
        f"| counter update period (median; polled at {rep['counter'].get('poll_hz', 0):.0f} Hz) | "
        f"{_f(rep['counter_period_s'], '.4f')} s |",
        f"| counter energy vs ∫ instant power ({rep['counter'].get('power_field', '')}) | {_pct(rep['counter_vs_power_err'])} |",
        f"| idle power | {_f(rep['idle_power_w'], '.1f')} W |",
        f"| calibration R² ({cal.get('runs', 0)} runs) | {_f(cal.get('r2'), '.4f')} |",
        f"| J per prefill token (isolated; idle subtracted) | {iso('prefill', 'j_per_token')} "
        f"({iso('prefill', 'net_j_per_token')}) |",
        f"| J per decode token (isolated; idle subtracted) | {iso('decode', 'j_per_token')} "
        f"({iso('decode', 'net_j_per_token')}) |",
        f"| phase_err prefill / decode (idle subtracted) | {err('phase_err', 'prefill')} / {err('phase_err', 'decode')} |",
        f"| phase_err gross prefill / decode | {err('phase_err_gross', 'prefill')} / {err('phase_err_gross', 'decode')} |",
        f"| mixed total vs isolated total (run-to-run) | {_pct(_get(rep, 'mixed', 'total_vs_isolation'))} |",
        f"| conservation error | {_f(_get(rep, 'mixed', 'conservation_error'), '.1e')} |",
        f"| long-context extra energy: attributed vs isolated (`kv_err`) | {_pct(kv.get('kv_err'))} |",
        f"| KV component: attributed vs measured (`kv_component_err`) | {_pct(kv.get('kv_component_err'))} |",
        f"| Zeus | {zeus['status']}" + (f", max power disagreement {_pct(zeus['max_abs_power_err'])}"
                                       if zeus.get("max_abs_power_err") is not None else "") + " |",
    ]
    chunked = _get(rep, "policies", "chunked", "mixed", "phase_err")
    if chunked:
        lines.append(f"| chunked-prefill steps: split vs isolation-proportional prefill / decode | "
                     f"{_pct(chunked['prefill'])} / {_pct(chunked['decode'])} (convention, see docs) |")
    ok = rep["acceptance"]
    lines += ["", f"Targets: phase_err ≤ {100 * rep['phase_err_target']:.0f} % "
              f"({'met' if ok['phase_err_ok'] else 'NOT met'}: {_pct(rep.get('phase_err'))}), calibration R² ≥ 0.95 "
              f"({'met' if ok['calibration_r2_ok'] else 'NOT met'})."]
    if rep.get("errors"):
        lines.append(f"Stages that failed: {', '.join(rep['errors'])} (see the JSON report).")
    return "\n".join(lines) + "\n\n"


def append_markdown(path: Path, rep: dict) -> None:
    old = path.read_text() if path.exists() else ""
    sep = "" if not old or old.endswith("\n\n") else ("\n" if old.endswith("\n") else "\n\n")
    atomic_write(path, (old + sep + section_markdown(rep)).encode())


def summary_text(rep: dict) -> str:
    return (f"[gpu_validate] {rep['device']['name']}: phase_err {_pct(rep.get('phase_err'))} "
            f"(prefill {_pct(_get(rep, 'mixed', 'phase_err', 'prefill'))}, "
            f"decode {_pct(_get(rep, 'mixed', 'phase_err', 'decode'))}); "
            f"counter period {_f(rep['counter_period_s'], '.3f')} s; counter vs power {_pct(rep['counter_vs_power_err'])}; "
            f"calibration R² {_f(rep['calibration'].get('r2'), '.4f')}; kv_err {_pct(rep['kv'].get('kv_err'))}; "
            f"total {rep['timings_s']['total']:.0f} s" + (f"; FAILED: {', '.join(rep['errors'])}" if rep.get("errors") else ""))
