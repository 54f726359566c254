"""Benchmark: offline vs online attribution accuracy on the same simulated traces.

Each trace comes from the simulated twin (Llama-3.1-8B geometry, H100 twin, NVML-like counter polled at
50 reads/s, locked onto its republication like the sampler, or `--poll uniform`) at one arrival rate; recording starts with the workload (the first step begins inside the first
counter period). The offline driver (`wattprint attribute`) and the online driver replayed as the sidecar
receives it (`wattprint attribute --online --meter-hz 50`: readings at 50 Hz, steps in the hook's batches)
attribute the same files; both are compared with the twin's ground truth.

    .venv/bin/python bench/bench_online.py [--rates 0.2 1 5 15 30] [--seeds 2] [--requests 200]
"""

from __future__ import annotations

import argparse
import platform
from datetime import date

import numpy as np

from wattprint.configs import config_dir
from wattprint.profiler.attribution.offline import attribute
from wattprint.profiler.attribution.replay import replay_online
from wattprint.profiler.core.costmodel import geometry_from_config
from wattprint.profiler.core.hardware import load_profile
from wattprint.profiler.meters.replay import readings_from_samples
from wattprint.profiler.twin.simulate import WorkloadSpec, simulate


def errors(requests, totals, sim, energy_span):
    truth = sim.truth
    err = np.array([abs(r.energy_j / truth[r.id].energy_j - 1) for r in requests])
    kv = np.array([abs(r.kv_j / truth[r.id].kv_j - 1) for r in requests if truth[r.id].kv_j > 0])
    pre = sum(r.prefill_j for r in requests) / sum(t.prefill_j for t in truth.values()) - 1
    dec = sum(r.decode_j for r in requests) / sum(t.decode_j for t in truth.values()) - 1
    cons = abs(sum(r.energy_j for r in requests) + totals.idle_j - totals.measured_j - totals.extrapolated_j)
    return {"median": np.median(err), "p95": np.percentile(err, 95), "prefill": abs(pre), "decode": abs(dec),
            "kv": np.median(kv), "idle": abs(totals.idle_j / energy_span - 1) if energy_span > 0 else float("nan"),
            "cons": cons / totals.measured_j}


def true_idle(sim, t0, t1):
    """The twin's true idle energy inside [t0, t1] (sensor scale)."""
    idle = 0.0
    starts = np.array([s.t_start for s in sim.steps])
    ends = np.array([s.t_end for s in sim.steps])
    s0, s1 = np.clip(starts, t0, t1), np.clip(ends, t0, t1)
    for tr, gain in zip(sim.traces, sim.gains):
        busy = float((tr.energy_until(s1) - tr.energy_until(s0)).sum())
        idle += gain * (float(tr.energy_until(t1) - tr.energy_until(t0)) - busy)
    return idle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", type=float, nargs="+", default=[0.2, 1.0, 5.0, 15.0, 30.0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=1.0,
                    help="requests per trace: rate × this many minutes (at least 20, at most --requests)")
    ap.add_argument("--model", default="llama-3.1-8b", help="a model config in configs/models (name)")
    ap.add_argument("--hardware", default="h100-sxm", help="the twin's and the prior's hardware profile")
    ap.add_argument("--devices", type=int, default=1, help="tensor-parallel devices")
    ap.add_argument("--poll", choices=("locked", "uniform"), default="locked",
                    help="the recorded poller's schedule (the sampler's: locked onto the counter's phase)")
    args = ap.parse_args()
    g = geometry_from_config(config_dir() / "models" / f"{args.model}.json")
    hw = load_profile(args.hardware)
    print(f"## Offline vs online accuracy ({date.today()}, {platform.processor() or platform.machine()})\n")
    print(f"`.venv/bin/python bench/bench_online.py --rates {' '.join(map(str, args.rates))} "
          f"--seeds {args.seeds} --first-seed {args.first_seed} --requests {args.requests} --minutes {args.minutes:g} "
          f"--model {args.model} "
          f"--hardware {args.hardware} --devices {args.devices} --poll {args.poll}`\n")
    print("| rate (req/s) | seed | driver | request err median | p95 | prefill total | decode total | "
          "KV (v2) median | idle | conservation |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = {"offline": {}, "online": {}}
    delays = []  # online: each final's delay after its request's last step (s), before the trace's end
    for rate in args.rates:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            n = max(20, min(args.requests, int(rate * 60 * args.minutes)))
            spec = WorkloadSpec(requests=n, rate_rps=rate, seed=1000 + seed, busy_s=40, quiet_s=4)
            # recording starts with the workload: the poller starts 10 ms before the first step
            sim = simulate(g, hw, spec, n_devices=args.devices, poll_schedule=args.poll, record_lead_s=0.01)
            energy = sim.energy
            t_end = max(e.t for e in energy)
            off = attribute(sim.steps, energy, g, hw, source="simulated")
            on = replay_online(sim.steps, readings_from_samples(energy, "simulated"), g, hw, source="simulated",
                               meter_hz=50.0)
            delays += [on.emitted_at_s[r.id] - r.t_end for r in on.requests
                       if r.status == "final" and on.emitted_at_s[r.id] < t_end]
            for name, res in (("offline", off), ("online", on)):
                span_idle = true_idle(sim, res.totals.t_start, res.totals.t_end or t_end)
                e = errors(res.requests, res.totals, sim, span_idle)
                for k, v in e.items():
                    worst[name][k] = max(worst[name].get(k, 0.0), v)
                print(f"| {rate:g} | {seed} | {name} | {100 * e['median']:.2f} % | {100 * e['p95']:.2f} % | "
                      f"{100 * e['prefill']:.2f} % | {100 * e['decode']:.2f} % | {100 * e['kv']:.2f} % | "
                      f"{100 * e['idle']:.1f} % | {e['cons']:.1e} |", flush=True)
    for name, w in worst.items():
        print(f"| **worst** | | {name} | {100 * w['median']:.2f} % | {100 * w['p95']:.2f} % | "
              f"{100 * w['prefill']:.2f} % | {100 * w['decode']:.2f} % | {100 * w['kv']:.2f} % | "
              f"{100 * w['idle']:.1f} % | {w['cons']:.1e} |")
    if delays:
        d = np.array(delays)
        print(f"\nOnline finals emitted before the trace's end: {len(d)}; delay after the request's last step "
              f"(trace time): median {np.median(d):.0f} s, p95 {np.percentile(d, 95):.0f} s, max {d.max():.0f} s")


if __name__ == "__main__":
    main()
