"""Benchmark: offline attribution speed and accuracy on traces from the simulated GPU twin.

Speed: a trace of ~16,000 steps, ~3,000 requests, ~1.9 million request-step entries is attributed
end to end by the ``wattprint attribute`` command (interpreter start, parsing, fit, split, output):
steps.jsonl pinned to one core and on every usable core (its chunks decoded in parallel), and its
Parquet copy pinned (identical requests.jsonl checked); CPU time (user+sys, workers included) and wall
time, medians of several runs.

Accuracy: per-request, phase, KV and idle errors against the twin's ground truth over several seeds.

    .venv/bin/python bench/bench_attribution.py [--runs 5] [--seeds 5] [--skip-speed] [--skip-accuracy]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from wattprint.configs import config_dir
from wattprint.profiler.attribution.offline import attribute
from wattprint.profiler.core.costmodel import geometry_from_config
from wattprint.profiler.core.hardware import load_profile
from wattprint.profiler.twin.simulate import WorkloadSpec, simulate

CACHE = Path(__file__).resolve().parent / ".cache"
SPEED_SPEC = WorkloadSpec(requests=3000, rate_rps=10.0, output_max=1280, quiet_s=0.0, seed=1)


def count_steps(path) -> tuple[int, int]:
    """Steps and request-step entries in a steps file (either JSON-lines form)."""
    from contextlib import closing

    from wattprint.profiler.core.parallel import iter_step_columns

    n_steps = n_entries = 0
    with closing(iter_step_columns(path)) as chunks:
        for times, entries in chunks:
            n_steps += len(times)
            n_entries += len(entries.prefill)
    return n_steps, n_entries



def speed(runs: int) -> None:
    g = geometry_from_config(config_dir() / "models" / "llama-3.1-8b.json")
    hw = load_profile("h100-sxm")
    trace = CACHE / "speed"
    if not (trace / "steps.jsonl").exists():
        print("generating the speed trace (once) ...", flush=True)
        simulate(g, hw, SPEED_SPEC).write(trace)
    if not (trace / "steps.parquet").exists() or \
            (trace / "steps.parquet").stat().st_mtime < (trace / "steps.jsonl").stat().st_mtime:
        from wattprint.commands.convert import convert  # what `wattprint convert` runs

        convert(str(trace / "steps.jsonl"), str(trace / "steps.parquet"))
    n_steps, n_entries = count_steps(trace / "steps.jsonl")
    size_mb = (trace / "steps.jsonl").stat().st_size / 1e6
    one = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # (format, pinned to one core): steps.jsonl is decoded on every usable core unless pinned
    cases = [("jsonl", True), ("jsonl", False), ("parquet", True)]
    wall: dict[tuple, list[float]] = {c: [] for c in cases}
    cpu: dict[tuple, list[float]] = {c: [] for c in cases}
    for _ in range(runs):  # interleaved, so that a busy moment hits every case alike
        for fmt, pinned in cases:
            cmd = command(trace, fmt)
            t, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run((one if pinned else []) + cmd, check=True, env=env)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # with the command's workers
            wall[fmt, pinned].append(time.perf_counter() - t)
            cpu[fmt, pinned].append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    same = (trace / "requests-jsonl.jsonl").read_bytes() == (trace / "requests-parquet.jsonl").read_bytes()
    print(f"\n## Offline attribution speed ({date.today()})\n")
    print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores ({cores} usable), "
          f"Python {platform.python_version()}")
    print(f"- trace: {n_steps} steps, {n_entries} request-step entries, {size_mb:.0f} MB steps.jsonl "
          f"({(trace / 'steps.parquet').stat().st_size / 1e6:.1f} MB steps.parquet), {SPEED_SPEC.requests} requests")
    print(f"- command: `{' '.join(['wattprint'] + command(trace, 'jsonl')[3:])}` (and steps.parquet), "
          f"pinned with `{' '.join(one)}` or on the {cores} usable cores")
    for fmt, pinned in cases:
        w, c = wall[fmt, pinned], cpu[fmt, pinned]
        where = "one core" if pinned and one else f"{cores} cores"
        print(f"- steps.{fmt}, {where}, end to end: CPU (user+sys, workers included) median {statistics.median(c):.2f} s, "
              f"wall median {statistics.median(w):.2f} s over {runs} runs (wall min {min(w):.2f}, max {max(w):.2f})")
    ratio = statistics.median(cpu["jsonl", True]) / statistics.median(cpu["parquet", True])
    print(f"- Parquet {ratio:.2f}x faster than JSON lines (CPU, one core, medians); requests.jsonl byte-identical: {same}")


def command(trace: Path, fmt: str) -> list[str]:
    return [sys.executable, "-m", "wattprint.cli", "attribute", "--steps", str(trace / f"steps.{fmt}"),
            "--energy", str(trace / "energy.jsonl"), "--model", "llama-3.1-8b", "--hardware", "h100-sxm",
            "--out", str(trace / f"requests-{fmt}.jsonl"), "--summary", str(trace / f"summary-{fmt}.json"), "-q"]


def accuracy(seeds: int) -> None:
    g = geometry_from_config(config_dir() / "models" / "llama-3.1-8b.json")
    hw = load_profile("h100-sxm")
    rows = []
    for seed in range(100, 100 + seeds):
        for ndev in (1, 2):
            spec = WorkloadSpec(requests=400, rate_rps=float(4 + 3 * (seed % 4)), seed=seed, busy_s=30, quiet_s=5)
            sim = simulate(g, hw, spec, n_devices=ndev)
            a = attribute(sim.steps, sim.energy, g, hw, source="simulated")
            tr = sim.truth
            err = np.array([abs(r.energy_j / tr[r.id].energy_j - 1) for r in a.requests])
            kv = np.array([abs(r.kv_j / tr[r.id].kv_j - 1) for r in a.requests])
            pre = abs(sum(r.prefill_j for r in a.requests) / sum(t.prefill_j for t in tr.values()) - 1)
            dec = abs(sum(r.decode_j for r in a.requests) / sum(t.decode_j for t in tr.values()) - 1)
            idle = abs(a.totals.idle_j / sim.truth_idle_j - 1)
            cons = abs(a.totals.attributed_j + a.totals.idle_j - a.totals.measured_j) / a.totals.measured_j
            rows.append((seed, ndev, np.median(err), np.percentile(err, 95), pre, dec, np.median(kv), idle, cons))
    print(f"\n## Attribution accuracy against the twin's ground truth ({date.today()})\n")
    print("| seed | GPUs | request err median | p95 | prefill total | decode total | KV median | idle | conservation |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {100 * r[2]:.2f} % | {100 * r[3]:.2f} % | {100 * r[4]:.2f} % | "
              f"{100 * r[5]:.2f} % | {100 * r[6]:.2f} % | {100 * r[7]:.1f} % | {r[8]:.1e} |")
    cols = np.array([r[2:] for r in rows])
    med = np.median(cols, axis=0)
    print(f"| **median** | | {100 * med[0]:.2f} % | {100 * med[1]:.2f} % | {100 * med[2]:.2f} % | "
          f"{100 * med[3]:.2f} % | {100 * med[4]:.2f} % | {100 * med[5]:.1f} % | {med[6]:.1e} |")
    worst = cols.max(axis=0)
    print(f"| **worst** | | {100 * worst[0]:.2f} % | {100 * worst[1]:.2f} % | {100 * worst[2]:.2f} % | "
          f"{100 * worst[3]:.2f} % | {100 * worst[4]:.2f} % | {100 * worst[5]:.1f} % | {worst[6]:.1e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    a = p.parse_args()
    if not a.skip_accuracy:
        accuracy(a.seeds)
    if not a.skip_speed:
        speed(a.runs)


if __name__ == "__main__":
    main()
