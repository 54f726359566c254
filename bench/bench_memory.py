"""Benchmark: peak memory and speed of ``wattprint attribute`` as traces grow.

Simulated traces at 20 requests/s (Llama-3.1-8B geometry on the H100 twin) of 3,000 and 12,000
requests; each is attributed end to end by the command in a fresh process pinned to the cores
``--cpus`` names (default: one core; ``--cpus 0,1``: steps.jsonl decoded on two, by this process and a
forked worker), and that process reports its own peak resident memory (``ru_maxrss``), its largest
worker's, and its wall time; a thread samples the proportional set size (PSS: shared pages counted
once) of the process and its live workers every 20 ms, whose largest sum is parent + workers.

    .venv/bin/python bench/bench_memory.py [--requests 3000 12000] [--runs 3] [--cpus 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

from bench_attribution import count_steps  # this directory: the benchmarks share it

CACHE = Path(__file__).resolve().parent / ".cache"
CHILD = """
import glob, os, resource, sys, threading, time
from wattprint.cli import main

def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0

def sample(peak, me=os.getpid()):  # this process and its live workers, every 20 ms
    while True:
        kids = [int(k) for c in glob.glob(f"/proc/{me}/task/*/children") for k in open(c).read().split()]
        peak[0] = max(peak[0], sum(map(pss_kb, [me, *kids])))
        time.sleep(0.02)

def hwm_kb():  # this process's own peak (ru_maxrss keeps the forking parent's across exec)
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:"))

peak = [0]
threading.Thread(target=sample, args=(peak,), daemon=True).start()
t = time.perf_counter()
rc = main(sys.argv[1:])
print("RESULT", rc, time.perf_counter() - t, hwm_kb() / 1024,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, peak[0] / 1024)
"""



def trace(n: int) -> Path:
    d = CACHE / f"mem-{n}"
    if not (d / "steps.jsonl").exists():
        from wattprint.commands.common import model_geometry
        from wattprint.profiler.core.hardware import load_profile
        from wattprint.profiler.twin.simulate import WorkloadSpec, simulate

        print(f"generating the {n}-request trace (once) ...", flush=True)
        spec = WorkloadSpec(requests=n, rate_rps=20.0, output_max=1280, quiet_s=0.0, seed=7)
        simulate(model_geometry("llama-3.1-8b"), load_profile("h100-sxm"), spec).write(d)
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, nargs="+", default=[3000, 12000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cpus", default="0", help="taskset CPU list (default: one core)")
    args = ap.parse_args()
    pin = ["taskset", "-c", args.cpus] if shutil.which("taskset") else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"\n## attribute: peak memory and speed ({date.today()}, {platform.machine()}, {os.cpu_count()} cores)\n")
    print(f"`.venv/bin/python bench/bench_memory.py --requests {' '.join(map(str, args.requests))} --runs {args.runs} "
          f"--cpus {args.cpus}` (`taskset -c {args.cpus}`)\n")
    print("| requests | steps | request-step entries | steps.jsonl | peak RSS (median) | largest worker | "
          "parent + workers, PSS (max) | wall (median) | entries/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.requests:
        d = trace(n)
        steps, entries = count_steps(d / "steps.jsonl")
        cmd = [sys.executable, "-c", CHILD, "attribute", "--steps", str(d / "steps.jsonl"), "--energy",
               str(d / "energy.jsonl"), "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--out",
               str(d / "requests.jsonl"), "--summary", str(d / "summary.json"), "-q"]
        rss, child, pss, wall = [], [], [], []
        for _ in range(args.runs):
            out = subprocess.run(pin + cmd, check=True, env=env, capture_output=True, text=True).stdout
            _, rc, w, m, c, p = next(x for x in out.splitlines() if x.startswith("RESULT")).split()
            assert rc == "0"
            rss.append(float(m))
            child.append(float(c))
            pss.append(float(p))
            wall.append(float(w))
        summary = json.loads((d / "summary.json").read_text())
        assert summary["conservation_error"] <= 1e-9
        mb = (d / "steps.jsonl").stat().st_size / 1e6
        print(f"| {n} | {steps} | {entries:,} | {mb:.0f} MB | {statistics.median(rss):.0f} MB | {max(child):.0f} MB | "
              f"{max(pss):.0f} MB | {statistics.median(wall):.2f} s | {entries / statistics.median(wall) / 1e6:.2f} M |",
              flush=True)



if __name__ == "__main__":
    main()
