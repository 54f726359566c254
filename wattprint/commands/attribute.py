"""``wattprint attribute``: re-attribute recorded traces (steps + energy) to requests.

One trace (``--steps --energy --out``), or many instance directories at once (``--instances DIR ...``,
each holding steps and energy as .jsonl or .parquet; outputs written into each) on a process pool (``--jobs``).
Offline by default (one global fit); ``--online`` replays a trace through the sidecar's streaming core.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(a: argparse.ArgumentParser) -> None:
    a.add_argument("--steps", help="steps.jsonl or steps.parquet")
    a.add_argument("--energy", help="energy.jsonl or energy.parquet")
    a.add_argument("--out", help="requests.jsonl to write")
    a.add_argument("--summary", help="summary.json to write")
    a.add_argument("--instances", nargs="+", metavar="DIR",
                   help="instead of --steps/--energy/--out: directories with steps.jsonl and energy.jsonl; "
                        "requests.jsonl and summary.json are written into each")
    a.add_argument("--jobs", type=int, default=1, help="with --instances: processes to use (default 1)")
    a.add_argument("--model", required=True, help="model config.json, model directory, or shipped name")
    a.add_argument("--hardware", required=True, help="hardware profile YAML or shipped name (e.g. h100-sxm)")
    a.add_argument("--window-s", type=float, default=2.0, help="settlement block length (s)")
    a.add_argument("--source", help="override the energy source label")
    a.add_argument("--online", action="store_true",
                   help="replay the trace through the streaming core as the sidecar receives it")
    a.add_argument("--meter-hz", type=float, default=None,
                   help="with --online: read the recorded counter this many times a second, on the sampler's schedule (locked onto its republication; default: the recording as it is)")
    a.add_argument("--limit", type=int, default=20, help="rows of the printed table")
    a.add_argument("-q", "--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from wattprint.errors import ConfigError

    if args.meter_hz is not None and not args.online:
        raise ConfigError("--meter-hz goes with --online")
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    if args.instances:
        if args.steps or args.energy or args.out or args.summary:
            raise ConfigError("--instances replaces --steps, --energy, --out and --summary")
        return _run_instances(args)
    if not (args.steps and args.energy and args.out):
        raise ConfigError("give --steps, --energy and --out (or --instances DIR ...)")
    result = attribute_one(args.steps, args.energy, args.out, args.summary, vars(args))
    if not args.quiet:
        from wattprint.exporters.report import print_report  # rich: only when a table is printed

        print_report(result.requests, result.totals, limit=args.limit)
    return 0


def attribute_one(steps_path, energy_path, out, summary, opts: dict):
    """Attribute one trace and write its files (checked for conservation first); returns the result."""
    from wattprint.commands.common import energy_source, load_steps_file, model_config_path, read_energy_file
    from wattprint.commands.output import check_conservation, write_requests, write_summary
    from wattprint.profiler.attribution.offline import attribute_file
    from wattprint.profiler.core.costmodel import geometry_from_config
    from wattprint.profiler.core.hardware import load_profile

    config = model_config_path(opts["model"])
    g = geometry_from_config(config)
    hw = load_profile(opts["hardware"])
    samples = read_energy_file(energy_path)
    source = opts.get("source") or energy_source(samples)
    kw = {"source": source, "window_s": opts.get("window_s", 2.0), "model_name": g.name}
    extra = {}
    if opts.get("online"):
        from wattprint.profiler.attribution.replay import replay_online
        from wattprint.profiler.meters.replay import readings_from_samples

        result = replay_online(load_steps_file(steps_path).steps, readings_from_samples(samples, source), g, hw,
                               meter_hz=opts.get("meter_hz"), **kw)
        extra = {"driver": "online", "meter_hz": opts.get("meter_hz")}
    else:
        result = attribute_file(steps_path, samples, g, hw, energy_path=str(energy_path), **kw)
    check_conservation(result.totals, result.requests)
    write_requests(out, result.requests)
    if summary:
        write_summary(summary, result.totals, model=g.name, model_config=str(config), model_geometry=g.to_dict(),
                      hardware=hw.name, **extra)
    return result


def _one_instance(job: tuple[str, dict]) -> tuple[str, str | None]:
    from wattprint.errors import WattprintError

    d, opts = job
    try:
        attribute_one(_trace_file(d, "steps"), _trace_file(d, "energy"), Path(d) / "requests.jsonl",
                      Path(d) / "summary.json", opts)
    except WattprintError as exc:
        return d, str(exc)
    return d, None


def _trace_file(d: str, name: str) -> Path:
    """``DIR/NAME.parquet`` if there is one, else ``DIR/NAME.jsonl``."""
    parquet = Path(d) / f"{name}.parquet"
    return parquet if parquet.exists() else Path(d) / f"{name}.jsonl"


def _run_instances(args: argparse.Namespace) -> int:
    """One output per instance; a bad instance is reported and the others still run (exit 2 if any
    failed)."""
    import sys

    opts = {k: v for k, v in vars(args).items() if k not in ("func", "instances")}
    jobs = [(d, opts) for d in args.instances]
    if args.jobs == 1 or len(jobs) == 1:
        done = list(map(_one_instance, jobs))
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs))) as pool:
            done = list(pool.map(_one_instance, jobs))
    failed = 0
    for d, err in done:
        if err is None:
            print(f"{d}: requests.jsonl summary.json")
        else:
            failed += 1
            print(f"wattprint attribute: error: {err}", file=sys.stderr)
    return 2 if failed else 0
