"""``wattprint simulate``: a trace with ground truth from the simulated GPU twin."""

from __future__ import annotations

import argparse


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", required=True)
    s.add_argument("--model", default="llama-3.1-8b")
    s.add_argument("--hardware", default="h100-sxm")
    s.add_argument("--requests", type=int, default=300)
    s.add_argument("--rate", type=float, default=8.0, help="Poisson arrival rate (requests/s)")
    s.add_argument("--devices", type=int, default=1, help="tensor-parallel GPUs")
    s.add_argument("--max-batched-tokens", type=int, default=2048)
    s.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from wattprint.commands.common import model_geometry
    from wattprint.profiler.core.hardware import load_profile
    from wattprint.profiler.twin.simulate import WorkloadSpec, simulate

    g = model_geometry(args.model)
    hw = load_profile(args.hardware)
    spec = WorkloadSpec(requests=args.requests, rate_rps=args.rate, seed=args.seed,
                        max_batched_tokens=args.max_batched_tokens)
    sim = simulate(g, hw, spec, n_devices=args.devices)
    sim.write(args.out)
    Console(stderr=True).print(
        f"[bold]simulated[/] {len(sim.steps)} steps, {len(sim.truth)} requests, {args.devices} device(s) "
        f"-> {args.out}/steps.jsonl, energy.jsonl, truth.jsonl (source: simulated, not a measurement)")
    return 0
