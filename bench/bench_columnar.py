"""Benchmark: loading the speed trace (~1.9 M request-step entries) from Parquet against JSON lines.

The trace is bench_attribution.py's (``bench/.cache/speed/``, generated here when missing); its Parquet
copy is written by ``wattprint convert``'s function. Each run is a fresh interpreter pinned to one core that times
one load; the median of the runs is reported. Two loads of each file: what ``wattprint attribute`` does
(``compact``: read a chunk at a time, validate, into the attribution's compact columns; Parquet without
a Python object per entry) and the full records (``records``: ``records.load_steps`` /
``tracefiles.load_steps_parquet``, a StepTrace). Before timing, both formats are checked to give
identical contents (compact columns and request metadata; records and entry columns).

    .venv/bin/python bench/bench_columnar.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

CACHE = Path(__file__).resolve().parent / ".cache" / "speed"
COMPACT = ("from wattprint.profiler.attribution.compact import CompactTrace\n"
           "from wattprint.commands.common import model_geometry\n{chunks}\n"
           "def load(p):\n    t = CompactTrace(model_geometry('llama-3.1-8b'))\n"
           "    for s, e in chunks(p):\n        t.add(s, e)\n    return t.n_steps\n")
LOADERS = {  # (file, how): code defining load(path)
    ("steps.jsonl", "compact"): COMPACT.format(
        chunks="from wattprint.profiler.core.records import iter_step_chunks as chunks"),
    ("steps.parquet", "compact"): COMPACT.format(
        chunks="from wattprint.profiler.core.tracefiles import iter_step_columns_parquet as chunks"),
    ("steps.jsonl", "records"): "from wattprint.profiler.core.records import load_steps as load",
    ("steps.parquet", "records"): "from wattprint.profiler.core.tracefiles import load_steps_parquet as load",
    ("energy.jsonl", "records"): "from wattprint.profiler.core.records import read_energy as load",
    ("energy.parquet", "records"): "from wattprint.profiler.core.tracefiles import read_energy_parquet as load",
}


def ensure_trace() -> None:
    from wattprint.commands.convert import convert  # what `wattprint convert` runs

    if not (CACHE / "steps.jsonl").exists():
        from wattprint.configs import config_dir
        from wattprint.profiler.core.costmodel import geometry_from_config
        from wattprint.profiler.core.hardware import load_profile
        from wattprint.profiler.twin.simulate import simulate

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_attribution import SPEED_SPEC

        print("generating the speed trace (once) ...", flush=True)
        g = geometry_from_config(config_dir() / "models" / "llama-3.1-8b.json")
        simulate(g, load_profile("h100-sxm"), SPEED_SPEC).write(CACHE)
    for name in ("steps", "energy"):
        src, dst = CACHE / f"{name}.jsonl", CACHE / f"{name}.parquet"
        if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
            t = time.perf_counter()
            convert(str(src), str(dst))
            print(f"converted {src.name} -> {dst.name} in {time.perf_counter() - t:.1f} s", flush=True)


def check_identical() -> int:
    from wattprint.profiler.core import records, tracefiles

    a, b = records.load_steps(CACHE / "steps.jsonl"), tracefiles.load_steps_parquet(CACHE / "steps.parquet")
    assert a.steps == b.steps, "steps differ"
    ea, eb = a.entries, b.entries
    assert ea.reqs == eb.reqs and ea.slot_ids == eb.slot_ids, "entries differ"
    for name in ("slot", "prefill", "decode", "context", "offsets"):
        assert np.array_equal(getattr(ea, name), getattr(eb, name)), name
    assert records.read_energy(CACHE / "energy.jsonl") == tracefiles.read_energy_parquet(CACHE / "energy.parquet")
    from wattprint.commands.common import model_geometry
    from wattprint.profiler.attribution.compact import CompactTrace

    traces = []
    for chunks, name in ((records.iter_step_chunks, "steps.jsonl"),
                         (tracefiles.iter_step_columns_parquet, "steps.parquet")):
        t = CompactTrace(model_geometry("llama-3.1-8b"))
        for steps, entries in chunks(CACHE / name):
            t.add(steps, entries)
        traces.append(t)
    (a, b), (ta, tb) = (t._arrays() for t in traces), (t.table for t in traces)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), "compact columns differ"
    n = len(ta.ids)
    assert ta.ids == tb.ids and ta.stratum == tb.stratum and np.array_equal(ta.data[:, :n], tb.data[:, :n]), \
        "metadata differ"
    return len(ea.reqs)


def time_load(key: tuple[str, str], pin: list[str], env: dict) -> tuple[float, float]:
    code = (f"import time\n{LOADERS[key]}\nt, c = time.perf_counter(), time.process_time()\n"
            f"x = load({str(CACHE / key[0])!r})\nprint(time.perf_counter() - t, time.process_time() - c)")
    out = subprocess.run(pin + [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    wall, cpu = map(float, out.stdout.split())
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7)
    a = p.parse_args()
    ensure_trace()
    entries = check_identical()
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    wall: dict[tuple[str, str], list[float]] = {n: [] for n in LOADERS}
    cpu: dict[tuple[str, str], list[float]] = {n: [] for n in LOADERS}
    for _ in range(a.runs):  # interleaved, so that a busy moment hits every loader alike
        for name in LOADERS:
            w, c = time_load(name, pin, env)
            wall[name].append(w)
            cpu[name].append(c)
    med = {n: statistics.median(v) for n, v in wall.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    print(f"\n## Columnar trace files: loading Parquet against JSON lines ({date.today()})\n")
    print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; pinned to one core: {bool(pin)}")
    print(f"- trace: bench/.cache/speed ({entries} request-step entries); identical contents checked")
    print(f"- command: `.venv/bin/python bench/bench_columnar.py --runs {a.runs}` (one load per fresh interpreter, "
          "imports not timed)")
    print("\n| file | load | size | wall, median | min | max | CPU, median |\n|---|---|---|---|---|---|---|")
    for (n, how), v in wall.items():
        size = (CACHE / n).stat().st_size / 1e6
        print(f"| {n} | {how} | {size:.1f} MB | {med[n, how]:.3f} s | {min(v):.3f} s | {max(v):.3f} s | "
              f"{med_cpu[n, how]:.3f} s |")
    for kind, how in (("steps", "compact"), ("steps", "records"), ("energy", "records")):
        j, q = (f"{kind}.jsonl", how), (f"{kind}.parquet", how)
        print(f"\n- {kind} ({how}): Parquet loads {med[j] / med[q]:.2f}x faster than JSON lines (wall, median; "
              f"CPU: {med_cpu[j] / med_cpu[q]:.2f}x)")


if __name__ == "__main__":
    main()
