"""Validate wattprint against a real GPU in one command (≤ 8 minutes on an H100/H200), or against the
simulated twin on a CPU (``--meter simulated --quick``: ≤ 3 minutes).

1. The energy counter: update period (polled at ≥ 1 kHz), counter energy against integrated instant
   power over a matrix-multiply load, idle power.
2. Calibration: wattprint's procedure on the device (short runs), writing a hardware profile.
3. A small real engine in PyTorch (random-weight Llama-3.1-8B shape in bf16 on a GPU, a tiny fp32 one on a
   CPU) with continuous batching, chunked prefill and a KV cache, recording ``steps.jsonl``.
4. Prefill-only and decode-only isolation replays of a workload, then the mixed workload attributed by
   wattprint: per-phase error (``phase_err``); the same for the extra energy of a long KV context.
5. Zeus's ``ZeusMonitor`` over the same windows where it can measure.

    python bench/gpu_validate.py --meter nvml --out gpu-validate.json          # on a GPU
    python bench/gpu_validate.py --meter simulated --quick --out v.json        # anywhere

See docs/gpu-validation.md for what each figure means and how to run it on a rented GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/gpuval
sys.path.append(str(Path(__file__).resolve().parents[1]))  # wattprint from this checkout when not installed

PHASE_ERR_TARGET = 0.05
R2_TARGET = 0.95


def parse_args(argv=None) -> argparse.Namespace:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--meter", choices=("nvml", "simulated"), default="nvml")
    a.add_argument("--quick", action="store_true", help="shorter runs (CI: ≤ 3 minutes with --meter simulated)")
    a.add_argument("--out", required=True, help="JSON report to write")
    a.add_argument("--results-md", nargs="?", const="bench/RESULTS.md", default=None, metavar="FILE",
                   help="append a section to this markdown file (bench/RESULTS.md when given without FILE)")
    a.add_argument("--workdir", default=None, help="keep traces and the calibrated profile here (default: a "
                   "private temporary directory next to --out, removed at the end)")
    a.add_argument("--device", type=int, default=0, help="NVML index of the GPU")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--target-s", type=float, default=None, help="seconds of each isolated phase (preset default)")
    a.add_argument("--policies", default=None, help="comma list of interleave,chunked (default both)")
    a.add_argument("--wave-s", type=float, default=1.0, help="requests arrive in waves of this many seconds on "
                   "and off (0: a steady closed loop)")
    a.add_argument("--skip-calibration", action="store_true", help="use a shipped profile as the prior")
    return a.parse_args(argv)


class Stages:
    """Runs each stage of the validation, timing it; a stage that fails is recorded in the report and the
    others go on (one shot on a lent GPU should still give every figure it can)."""

    def __init__(self, rep: dict):
        self.rep, self.timings, self.t_begin = rep, {}, time.monotonic()

    def __call__(self, name: str, fn, *args, **kwargs):
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.rep.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
            print(f"[gpu_validate] {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
            return None
        finally:
            self.timings[name] = round(time.monotonic() - t0, 2)
            print(f"[gpu_validate] {name}: {self.timings[name]:.1f} s", flush=True)


def setup_nvml(args, preset, rep, stage, work):
    """The GPU: its counter, calibration (the attribution's prior), the 8B-shape engine and its speed."""
    import torch
    from gpuval import calib, counter, plan, probe
    from gpuval.engine import Engine

    from wattprint.profiler.core.costmodel import geometry_from_config
    from wattprint.profiler.core.hardware import load_profile

    dev = probe.open_nvml(args.device)
    torch.cuda.set_device(dev.torch_device)
    config = json.loads((Path(__file__).resolve().parents[1] / "configs/models/llama-3.1-8b.json").read_text())
    g = geometry_from_config(config, name="llama-3.1-8b-random")
    rep["counter"] = stage("counter", counter.nvml_checks, dev, preset.load_s, preset.idle_s) or {}
    cal, hw = (({"status": "skipped"}, None) if args.skip_calibration else
               stage("calibration", calib.run_calibration, "nvml", work, device_index=args.device, seed=args.seed)
               or ({"status": "failed (see errors)"}, None))
    hw = hw or load_profile("h200" if "H200" in dev.device_name else "h100-sxm")
    idle_w = rep["counter"].get("idle", {}).get("idle_power_w") or cal.get("idle_power_w") or hw.idle_power_w
    engine = Engine(g, dev.torch_device, preset.slots, preset.max_ctx, args.seed)
    speed = stage("engine warm-up", plan.measure_speed, engine, preset)
    return dev, g, engine, speed, cal, hw, idle_w


def setup_simulated(args, preset, rep, stage, work):
    """The twin on a virtual clock and the tiny fp32 engine on the CPU (see gpuval/probe.py)."""
    import torch
    from gpuval import calib, counter, plan, probe, runner
    from gpuval.engine import TINY_CPU_CONFIG, Engine

    from wattprint.profiler.core.costmodel import geometry_from_config

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # the clock is virtual: one thread is fastest on a shared CPU
    g = geometry_from_config(TINY_CPU_CONFIG, name="tiny-llama-fp32")
    true = probe.sim_profile()
    dev = probe.open_simulated(true, args.seed)
    rep["idle"] = runner.idle_power_w(dev, preset.idle_s)
    rep["counter"] = stage("counter", counter.simulated_checks, true, args.seed, preset.load_s, preset.idle_s) or {}
    cal, hw = (({"status": "skipped"}, None) if args.skip_calibration else
               stage("calibration", calib.run_calibration, "simulated", work, true_profile=true, seed=args.seed)
               or ({"status": "failed (see errors)"}, None))
    engine = Engine(g, "cpu", preset.slots, preset.max_ctx, args.seed)
    stage("engine warm-up", plan.warm_up, engine, preset)
    return dev, g, engine, plan.simulated_speed(dev, g, preset), cal, hw or true, rep["idle"]["idle_power_w"]


def run_policy(ctx: dict, policy: str) -> dict:
    """Isolated prefill, isolated decode, then the mixed run attributed by wattprint."""
    from gpuval import checks, plan, runner, schedule

    args, g = ctx["args"], ctx["g"]
    w = plan.size_workload(ctx["preset"], ctx["speed"], policy, args.seed, args.target_s, args.wave_s)
    steps = schedule.build(w)
    runs = {}
    for name, s in (("prefill", schedule.only(steps, True)), ("decode", schedule.only(steps, False)), ("mixed", steps)):
        runs[name] = runner.execute(ctx["engine"], ctx["dev"], s, f"{policy}-{name}", ctx["zeus"])
        ctx["traces"][f"{policy}-{name}"] = runs[name].write(ctx["work"]) if ctx["keep"] else None
    iso = {"prefill": checks.isolation(runs["prefill"], True, ctx["idle_w"]),
           "decode": checks.isolation(runs["decode"], False, ctx["idle_w"])}
    att, cons = checks.attribute_run(runs["mixed"], g, ctx["hw"])
    return {"workload": w.__dict__ | {"steps": len(steps)}, "isolation": iso,
            "mixed": checks.mixed(runs["mixed"], att, cons, iso, ctx["idle_w"])}


def run_kv(ctx: dict) -> dict:
    """Decode at short, long and half-and-half contexts: what a long KV context costs, and what wattprint gives it."""
    from gpuval import checks, plan, runner, schedule

    p = ctx["preset"]
    n = plan.kv_steps(p, ctx["speed"])
    done = {k: runner.execute(ctx["engine"], ctx["dev"], s, f"kv-{k}", ctx["zeus"])
            for k, s in schedule.kv_blocks(p.kv_batch, n, p.kv_contexts).items()}
    for k, r in done.items():
        ctx["traces"][f"kv-{k}"] = r.write(ctx["work"]) if ctx["keep"] else None
    att, _ = checks.attribute_run(done["mixed"], ctx["g"], ctx["hw"])
    return checks.kv(done["short"], done["long"], done["mixed"], att, ctx["g"], ctx["hw"], ctx["idle_w"], p.kv_batch,
                     n, p.kv_contexts)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    keep = args.workdir is not None
    work = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix=".gpu-validate.", dir=out.parent.resolve()))
    try:
        work.mkdir(parents=True, exist_ok=True)
        os.chmod(work, 0o700)
        return validate(args, argv, out, work, keep)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def validate(args, argv, out: Path, work: Path, keep: bool) -> int:
    import torch
    from gpuval import checks, plan, report, runner

    preset = plan.PRESETS[(args.meter, args.quick)]
    rep: dict = {"tool": "bench/gpu_validate.py", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                 "meter": args.meter, "quick": args.quick, "host": platform.node(), "python": platform.python_version(),
                 "torch": torch.__version__, "phase_err_target": PHASE_ERR_TARGET}
    stage = Stages(rep)
    setup = setup_nvml if args.meter == "nvml" else setup_simulated
    dev, g, engine, speed, cal, hw, idle_w = setup(args, preset, rep, stage, work)
    try:
        zeus = runner.Zeus(dev)
        rep.update(device={"name": dev.device_name, "driver": dev.driver, "kind": dev.kind, "source": dev.source,
                           **dev.extra},
                   counter_period_s=rep["counter"].get("counter_period_s"),
                   counter_vs_power_err=rep["counter"].get("counter_vs_power_err"), idle_power_w=idle_w,
                   calibration=cal, prior_profile=hw.name, model=plan.geometry_summary(g), speed=speed,
                   zeus={"status": zeus.status})
        ctx = {"args": args, "preset": preset, "dev": dev, "g": g, "engine": engine, "speed": speed, "hw": hw,
               "idle_w": idle_w, "zeus": zeus, "work": work, "keep": keep, "traces": {}}
        policies = tuple(args.policies.split(",")) if args.policies else preset.policies
        rep["policies"] = {p: r for p in policies if (r := stage(f"workload {p}", run_policy, ctx, p)) is not None}
        main_policy = next((p for p in ("interleave", *policies) if p in rep["policies"]), None)
        if main_policy:
            rep.update(isolation=rep["policies"][main_policy]["isolation"], mixed=rep["policies"][main_policy]["mixed"])
            rep.update(phase_err=checks.headline(rep["mixed"]), phase_err_by_phase=rep["mixed"]["phase_err"])
        rep["kv"] = stage("kv", run_kv, ctx) or {}
    finally:
        dev.close()
    rep["zeus"].update(report.zeus_summary(rep))
    rep["timings_s"] = stage.timings | {"total": round(time.monotonic() - stage.t_begin, 2)}
    rep["acceptance"] = {"phase_err_ok": rep.get("phase_err") is not None and rep["phase_err"] <= PHASE_ERR_TARGET,
                         "calibration_r2_ok": (cal.get("r2") or 0.0) >= R2_TARGET}
    rep["traces"] = {"workdir": str(work), "files": ctx["traces"]} if keep else {"workdir": None}
    report.write_json(out, rep)
    if args.results_md:
        report.append_markdown(Path(args.results_md), rep)
    print(report.summary_text(rep), flush=True)
    return 1 if rep.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
