"""``wattprint report``: one self-contained HTML file of a run (a directory written by ``profile``,
``demo``, ``demo-offline`` or ``attribute``, or the files named one by one)."""

from __future__ import annotations

import argparse
from pathlib import Path

KINDS = ("requests", "summary", "steps", "energy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", help="run directory: requests.jsonl, summary.json and, where present, "
                                          "steps.jsonl and energy.jsonl (or their .parquet copies)")
    p.add_argument("--requests", help="requests.jsonl or .parquet (default: DIR's)")
    p.add_argument("--summary", help="summary.json (default: DIR's)")
    p.add_argument("--steps", help="steps.jsonl or .parquet (default: DIR's, when present)")
    p.add_argument("--energy", help="energy.jsonl or .parquet (default: DIR's, when present)")
    p.add_argument("--model", help="model config for the per-step figures (default: summary.json's model_config)")
    p.add_argument("--hardware", help="hardware profile (default: summary.json's hardware)")
    p.add_argument("--window-s", type=float, default=2.0, help="settlement block length of the re-attribution (s)")
    p.add_argument("--title", help="the report's title")
    p.add_argument("--out", help="HTML file to write (default: DIR/report.html, or report.html)")


def _find(directory: Path | None, kind: str, given: str | None) -> Path | None:
    if given:
        return Path(given)
    if directory is None:
        return None
    names = ("summary.json",) if kind == "summary" else (f"{kind}.parquet", f"{kind}.jsonl")
    return next((directory / n for n in names if (directory / n).exists()), None)


def _summary(path: Path) -> dict:
    import msgspec

    from wattprint.errors import InputError

    try:
        data = msgspec.json.decode(path.read_bytes())
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from exc
    except msgspec.DecodeError as exc:
        raise InputError(f"malformed JSON: {exc}", str(path)) from exc
    if not isinstance(data, dict):
        raise InputError("not a summary (a JSON object)", str(path))
    return data


def reattribute(steps_path: Path, energy_path: Path, summary: dict, args) -> tuple[object, object, str | None]:
    """The offline attribution of the run's trace (for its per-step energy) and the steps' counts, read a
    chunk at a time as ``attribute`` reads them (bounded memory); or why there is none."""
    from wattprint.commands.common import energy_source, model_config_path
    from wattprint.commands.output import check_conservation
    from wattprint.errors import InputError
    from wattprint.exporters.report_html import StepCounts
    from wattprint.profiler.attribution.compact import CompactTrace
    from wattprint.profiler.attribution.offline import attribute
    from wattprint.profiler.core.costmodel import geometry_from_config
    from wattprint.profiler.core.hardware import load_profile
    from wattprint.profiler.core.tracefiles import iter_step_chunks_any, read_energy_any

    model = args.model or summary.get("model_config") or summary.get("model")
    hardware = args.hardware or summary.get("hardware")
    if not model or not hardware:
        return None, None, ("per-step figures need the model config and the hardware profile: summary.json "
                            f"names no {'model_config' if not model else 'hardware'} (give --model / --hardware)")
    try:
        g = geometry_from_config(model_config_path(str(model)))
        hw = load_profile(str(hardware))
    except InputError as exc:  # ConfigError included
        return None, None, f"per-step figures: {exc}"
    samples = read_energy_any(energy_path)
    trace, counts = CompactTrace(g), []
    for steps, entries in iter_step_chunks_any(steps_path):
        trace.add(steps, entries)
        counts.append(StepCounts.of(entries))
    source = str(summary.get("source") or energy_source(samples))
    result = attribute(trace, samples, g, hw, source=source, window_s=args.window_s, model_name=g.name,
                       energy_path=str(energy_path))
    check_conservation(result.totals, result.requests)
    return result, StepCounts.concat(counts), None


def run(args: argparse.Namespace) -> int:
    from wattprint.errors import InputError
    from wattprint.exporters.report_html import write_report
    from wattprint.profiler.core.resultfiles import read_requests_any

    directory = Path(args.dir) if args.dir else None
    if directory is not None and not directory.is_dir():
        raise InputError("not a directory", str(directory))
    paths = {k: _find(directory, k, getattr(args, k)) for k in KINDS}
    for k in ("requests", "summary"):
        if paths[k] is None:
            raise InputError(f"no {k} file: give a run directory or --{k}")
    summary = _summary(paths["summary"])
    requests = read_requests_any(paths["requests"])
    notes, steps, attribution = [], None, None
    if paths["steps"] is not None and paths["energy"] is not None:
        attribution, steps, why = reattribute(paths["steps"], paths["energy"], summary, args)
        if why:
            notes.append(why)
    else:
        have = [k for k in ("steps", "energy") if paths[k] is not None]
        notes.append(f"no {'energy' if have else 'steps or energy'} file"
                     + (f" beside the {have[0]} file" if have else "") + ": only what requests and summary allow")
    out = Path(args.out) if args.out else (directory / "report.html" if directory else Path("report.html"))
    write_report(out, requests=requests, summary=summary, steps=steps, attribution=attribution, notes=notes,
                 title=args.title)
    print(f"wrote {out}")
    return 0
