"""``wattprint attribute``: re-attribute a recorded trace (steps + energy) to requests."""

from __future__ import annotations

import argparse


def add_arguments(a: argparse.ArgumentParser) -> None:
    a.add_argument("--steps", required=True, help="steps.jsonl")
    a.add_argument("--energy", required=True, help="energy.jsonl")
    a.add_argument("--model", required=True, help="model config.json, model directory, or shipped name")
    a.add_argument("--hardware", required=True, help="hardware profile YAML or shipped name (e.g. h100-sxm)")
    a.add_argument("--out", required=True, help="requests.jsonl to write")
    a.add_argument("--summary", help="summary.json to write")
    a.add_argument("--window-s", type=float, default=2.0, help="settlement block length (s)")
    a.add_argument("--source", help="override the energy source label")
    a.add_argument("--online", action="store_true",
                   help="replay the trace through the streaming core as the sidecar receives it")
    a.add_argument("--meter-hz", type=float, default=None,
                   help="with --online: poll the recorded counter at this rate (default: as recorded)")
    a.add_argument("--limit", type=int, default=20, help="rows of the printed table")
    a.add_argument("-q", "--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from wattprint.commands.common import energy_source, model_config_path
    from wattprint.commands.output import check_conservation, write_requests, write_summary
    from wattprint.errors import ConfigError
    from wattprint.profiler.attribution.offline import attribute
    from wattprint.profiler.core.costmodel import geometry_from_config
    from wattprint.profiler.core.hardware import load_profile
    from wattprint.profiler.core.records import load_steps, read_energy

    config = model_config_path(args.model)
    g = geometry_from_config(config)
    hw = load_profile(args.hardware)
    steps = load_steps(args.steps)
    samples = read_energy(args.energy)
    source = args.source or energy_source(samples)
    extra = {}
    if args.online:
        from wattprint.profiler.attribution.replay import replay_online
        from wattprint.profiler.meters.replay import readings_from_samples

        result = replay_online(steps.steps, readings_from_samples(samples, source), g, hw, source=source,
                               meter_hz=args.meter_hz, window_s=args.window_s, model_name=g.name)
        extra = {"driver": "online", "meter_hz": args.meter_hz}
    else:
        if args.meter_hz is not None:
            raise ConfigError("--meter-hz goes with --online")
        result = attribute(steps, samples, g, hw, source=source, window_s=args.window_s, model_name=g.name,
                           energy_path=str(args.energy))
    check_conservation(result.totals, result.requests)
    write_requests(args.out, result.requests)
    if args.summary:
        write_summary(args.summary, result.totals, model=g.name, model_config=str(config),
                      model_geometry=g.to_dict(), hardware=hw.name, **extra)
    if not args.quiet:
        from wattprint.exporters.report import print_report  # rich: only when a table is printed

        print_report(result.requests, result.totals, limit=args.limit)
    return 0
