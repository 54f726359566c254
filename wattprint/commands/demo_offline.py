"""``wattprint demo-offline``: simulate a trace on the GPU twin, attribute it, compare with the truth."""

from __future__ import annotations

import argparse


def add_arguments(o: argparse.ArgumentParser) -> None:
    o.add_argument("--out", default="wattprint-demo-offline")
    o.add_argument("--model", default="llama-3.1-8b")
    o.add_argument("--hardware", default="h100-sxm")
    o.add_argument("--requests", type=int, default=200)
    o.add_argument("--rate", type=float, default=6.0)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--limit", type=int, default=15)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    from rich.console import Console

    from wattprint.commands.common import model_geometry
    from wattprint.commands.output import check_conservation, write_requests, write_summary
    from wattprint.exporters.report import print_report
    from wattprint.profiler.attribution.offline import attribute
    from wattprint.profiler.core.hardware import load_profile
    from wattprint.profiler.twin.simulate import WorkloadSpec, simulate

    console = Console()
    console.rule("[bold]wattprint demo (offline)")
    console.print("[yellow bold]No GPU energy counter is used here: the energy comes from wattprint's "
                  "simulated H100 twin (source: simulated).[/]")
    g = model_geometry(args.model)
    hw = load_profile(args.hardware)
    with console.status("simulating a Poisson workload on the twin..."):
        sim = simulate(g, hw, WorkloadSpec(requests=args.requests, rate_rps=args.rate, seed=args.seed))
        out = Path(args.out)
        sim.write(out)
    with console.status("attributing measured joules to requests..."):
        result = attribute(sim.steps, sim.energy, g, hw, source="simulated", model_name=g.name)
    print_report(result.requests, result.totals, limit=args.limit, console=console)
    check_conservation(result.totals, result.requests)
    write_requests(out / "requests.jsonl", result.requests)
    write_summary(out / "summary.json", result.totals, model=g.name, hardware=hw.name)
    err = np.array([abs(r.energy_j / sim.truth[r.id].energy_j - 1) for r in result.requests])
    console.print(f"accuracy against the twin's ground truth: per-request error median "
                  f"{100 * np.median(err):.2f} %, p95 {100 * np.percentile(err, 95):.2f} %")
    console.print(f"files in {out}/: steps.jsonl energy.jsonl truth.jsonl requests.jsonl summary.json")
    return 0
