"""Benchmark: loading the speed trace (~1.9 M request-step entries) from Parquet against JSON lines, the
JSON lines in both forms of a steps line (requests as columns, what wattprint writes; one object per
request, older files), and ``wattprint attribute`` end to end on each.

The trace is bench_attribution.py's (``bench/.cache/speed/``, generated here when missing); its copies
are ``steps-columns.jsonl`` and ``steps-entries.jsonl`` (each form) and ``steps.parquet`` (``wattprint
convert``'s function). Each run is a fresh interpreter pinned to one core that times one load; the median
of the runs is reported. Two loads of each file: what ``wattprint attribute`` does (``compact``: read a
chunk at a time, validate, into the attribution's compact columns, on one core; Parquet and columnar
JSON lines without a Python object per entry) and the full records (``records``: ``records.load_steps``
/ ``tracefiles.load_steps_parquet``, a StepTrace). Before timing, every file is checked to give
identical contents (compact columns and request metadata; records and entry columns).

``--attribute``: instead, ``wattprint attribute ... -q`` on each steps file, interleaved, on every usable
core and pinned to one (``taskset -c 0``): wall and CPU time (user+sys, decoding workers included),
medians, the load average around the runs, and requests.jsonl checked byte-identical across files.

    .venv/bin/python bench/bench_columnar.py [--runs 7] [--attribute]
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

CACHE = Path(__file__).resolve().parent / ".cache" / "speed"
STEPS = ("steps-columns.jsonl", "steps-entries.jsonl", "steps.parquet")
COMPACT = ("from wattprint.profiler.attribution.compact import CompactTrace\n"
           "from wattprint.commands.common import model_geometry\n{chunks}\n"
           "def load(p):\n    t = CompactTrace(model_geometry('llama-3.1-8b'))\n"
           "    for s, e in chunks(p):\n        t.add(s, e)\n    return t.n_steps\n")
JSON_COMPACT = COMPACT.format(chunks="from functools import partial\n"
                              "from wattprint.profiler.core.parallel import iter_step_columns\n"
                              "chunks = partial(iter_step_columns, cores=1)")
LOADERS = {  # (file, how): code defining load(path)
    ("steps-columns.jsonl", "compact"): JSON_COMPACT,
    ("steps-entries.jsonl", "compact"): JSON_COMPACT,
    ("steps.parquet", "compact"): COMPACT.format(
        chunks="from wattprint.profiler.core.tracefiles import iter_step_columns_parquet as chunks"),
    ("steps-columns.jsonl", "records"): "from wattprint.profiler.core.records import load_steps as load",
    ("steps-entries.jsonl", "records"): "from wattprint.profiler.core.records import load_steps as load",
    ("steps.parquet", "records"): "from wattprint.profiler.core.tracefiles import load_steps_parquet as load",
    ("energy.jsonl", "records"): "from wattprint.profiler.core.records import read_energy as load",
    ("energy.parquet", "records"): "from wattprint.profiler.core.tracefiles import read_energy_parquet as load",
}


def ensure_trace() -> None:
    from wattprint.commands.convert import convert  # what `wattprint convert` runs
    from wattprint.profiler.core.records import encode_line, iter_step_chunks, step_line

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
    src = CACHE / "steps.jsonl"
    for name, write in (("steps-columns.jsonl", step_line), ("steps-entries.jsonl", encode_line)):
        if not (CACHE / name).exists() or (CACHE / name).stat().st_mtime < src.stat().st_mtime:
            with open(CACHE / name, "wb") as f:
                for steps, _ in iter_step_chunks(src):
                    f.write(b"".join(map(write, steps)))
    for name in ("steps", "energy"):
        src, dst = CACHE / f"{name}.jsonl", CACHE / f"{name}.parquet"
        if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
            t = time.perf_counter()
            convert(str(src), str(dst))
            print(f"converted {src.name} -> {dst.name} in {time.perf_counter() - t:.1f} s", flush=True)


def check_identical() -> int:
    from wattprint.commands.common import model_geometry
    from wattprint.profiler.attribution.compact import CompactTrace
    from wattprint.profiler.core import parallel, records, tracefiles

    ref = records.load_steps(CACHE / "steps-entries.jsonl")
    for other in (records.load_steps(CACHE / "steps-columns.jsonl"), tracefiles.load_steps_parquet(CACHE / "steps.parquet")):
        assert other.steps == ref.steps, "steps differ"
        ea, eb = ref.entries, other.entries
        assert ea.reqs == eb.reqs and ea.slot_ids == eb.slot_ids, "entries differ"
        for name in ("slot", "prefill", "decode", "context", "offsets"):
            assert np.array_equal(getattr(ea, name), getattr(eb, name)), name
        del other
    n = len(ref.entries.reqs)
    del ref
    assert records.read_energy(CACHE / "energy.jsonl") == tracefiles.read_energy_parquet(CACHE / "energy.parquet")
    traces = []
    for chunks, name in ((parallel.iter_step_columns, "steps-entries.jsonl"),
                         (parallel.iter_step_columns, "steps-columns.jsonl"),
                         (tracefiles.iter_step_columns_parquet, "steps.parquet")):
        t = CompactTrace(model_geometry("llama-3.1-8b"))
        for steps, entries in chunks(CACHE / name):
            t.add(steps, entries)
        traces.append(t)
    for other in traces[1:]:
        (a, b), (ta, tb) = (t._arrays() for t in (traces[0], other)), (traces[0].table, other.table)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), "compact columns differ"
        k = len(ta.ids)
        assert ta.ids == tb.ids and ta.stratum == tb.stratum and np.array_equal(ta.data[:, :k], tb.data[:, :k]), \
            "metadata differ"
    return n


def attribute_runs(runs: int, env: dict) -> None:
    """``wattprint attribute -q`` on each steps file, on every usable core and pinned to one."""
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    cases = [(name, pinned) for name in STEPS for pinned in (False, True)]
    wall: dict[tuple, list[float]] = {c: [] for c in cases}
    cpu: dict[tuple, list[float]] = {c: [] for c in cases}
    outs: dict[str, bytes] = {}
    load = [os.getloadavg()]
    for _ in range(runs):  # interleaved, so that a busy moment hits every case alike
        for name, pinned in cases:
            out = CACHE / f"requests-{name}.jsonl"
            cmd = [str(Path(sys.executable).parent / "wattprint"), "attribute", "--steps", str(CACHE / name),
                   "--energy", str(CACHE / "energy.jsonl"), "--model", "llama-3.1-8b", "--hardware", "h100-sxm",
                   "--out", str(out), "--summary", str(CACHE / f"summary-{name}.json"), "-q"]
            t, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run((pin if pinned else []) + cmd, check=True, env=env)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall[name, pinned].append(time.perf_counter() - t)
            cpu[name, pinned].append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
            outs[name] = out.read_bytes()
        load.append(os.getloadavg())
    same = len(set(outs.values())) == 1
    print(f"\n## wattprint attribute: steps as columns, as objects, as Parquet ({date.today()})\n")
    print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; load average (1 min) {min(x[0] for x in load):.2f}-"
          f"{max(x[0] for x in load):.2f} during the runs")
    print(f"- command: `wattprint attribute --steps bench/.cache/speed/FILE --energy ... -q`, {runs} runs "
          f"interleaved; requests.jsonl byte-identical across files: {same}")
    print("\n| steps file | size | cores | wall, median | min | max | CPU (user+sys), median |\n|---|---|---|---|---|---|---|")
    for (name, pinned), v in wall.items():
        print(f"| {name} | {(CACHE / name).stat().st_size / 1e6:.1f} MB | {'1 (taskset -c 0)' if pinned else 'all'} | "
              f"{statistics.median(v):.3f} s | {min(v):.3f} s | {max(v):.3f} s | "
              f"{statistics.median(cpu[name, pinned]):.3f} s |")
    if not same:
        raise SystemExit("requests.jsonl differ between the steps files")


def time_load(key: tuple[str, str], pin: list[str], env: dict) -> tuple[float, float]:
    code = (f"import time\n{LOADERS[key]}\nt, c = time.perf_counter(), time.process_time()\n"
            f"x = load({str(CACHE / key[0])!r})\nprint(time.perf_counter() - t, time.process_time() - c)")
    out = subprocess.run(pin + [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    wall, cpu = map(float, out.stdout.split())
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--attribute", action="store_true", help="time `wattprint attribute` end to end instead")
    a = p.parse_args()
    ensure_trace()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if a.attribute:
        attribute_runs(a.runs, env)
        return
    entries = check_identical()
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
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
    for j, q in ((("steps-columns.jsonl", "compact"), ("steps.parquet", "compact")),
                 (("steps-entries.jsonl", "compact"), ("steps.parquet", "compact")),
                 (("steps-columns.jsonl", "records"), ("steps.parquet", "records")),
                 (("energy.jsonl", "records"), ("energy.parquet", "records"))):
        print(f"\n- {j[0]} against {q[0]} ({j[1]}): Parquet loads {med[j] / med[q]:.2f}x faster (wall, median; "
              f"CPU: {med_cpu[j] / med_cpu[q]:.2f}x)")


if __name__ == "__main__":
    main()
