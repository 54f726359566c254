"""Trace simulator: a vLLM-like scheduler serving Poisson arrivals on the GPU twin.

It produces exactly what a real run records - ``steps.jsonl`` and ``energy.jsonl`` (an NVML-like
counter read 50 times a second on the sampler's schedule) - plus the ground truth no real run has: the true energy of every step,
split between requests by the v1 convention (``docs/attribution.md``), and the true idle energy.

Ground truth is expressed on the sensor's scale (true joules × the board's gain error): the gain is a
property of the sensor that attribution cannot see, only an external reference could remove it. The
physical joules are written alongside (``physical_j``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

from wattprint.files import open_private, private_dir
from wattprint.profiler.core import costmodel as cm
from wattprint.profiler.core.costmodel import ModelGeometry
from wattprint.profiler.core.hardware import HardwareProfile
from wattprint.profiler.core.records import EnergySample, RequestEntry, StepRecord, encode_line, step_line
from wattprint.profiler.timeline.schedule import PollSchedule, follow
from wattprint.profiler.twin.power import (
    GpuTwin,
    PowerTrace,
    SensorEffects,
    poll_counter,
    poll_times,
)

STRATA = ("critical", "science", "productive", "agentic")
WAKE_UP_S = 0.0002  # the sampler thread wakes up to this late


@dataclass
class WorkloadSpec:
    """What arrives: Poisson arrivals, log-uniform prompts, uniform output lengths, optional quiet periods."""

    requests: int = 300
    rate_rps: float = 8.0
    prompt_min: int = 8
    prompt_max: int = 6000
    output_min: int = 1
    output_max: int = 1500
    max_batched_tokens: int = 2048  # vLLM's max_num_batched_tokens (chunked prefill budget)
    max_seqs: int = 256
    busy_s: float = 40.0  # arrivals come for busy_s, then pause for quiet_s (idle periods)
    quiet_s: float = 4.0
    seed: int = 0


@dataclass
class TruthRequest:
    id: str
    energy_j: float = 0.0
    prefill_j: float = 0.0
    decode_j: float = 0.0
    kv_j: float = 0.0
    physical_j: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    stratum: str | None = None


@dataclass
class SimResult:
    steps: list[StepRecord]
    energy: list[EnergySample]
    truth: dict[str, TruthRequest]
    truth_idle_j: float
    truth_step_j: np.ndarray  # sensor-scale true energy of each step (summed over devices)
    measured_j: float
    physical_j: float
    gains: list[float]
    traces: list[PowerTrace] = field(repr=False, default_factory=list)

    def write(self, out_dir: str | Path) -> None:
        out = private_dir(out_dir)
        with open_private(out / "steps.jsonl") as f:
            for s in self.steps:
                f.write(step_line(s))
        with open_private(out / "energy.jsonl") as f:
            for e in self.energy:
                f.write(encode_line(e))
        with open_private(out / "truth.jsonl") as f:
            for t in self.truth.values():
                f.write(msgspec.json.encode({k: (float(v) if isinstance(v, np.floating) else v) for k, v in t.__dict__.items()}) + b"\n")
        summary = {
            "idle_j": float(self.truth_idle_j), "measured_j": float(self.measured_j), "physical_j": float(self.physical_j),
            "gains": self.gains, "source": "simulated",
            "note": "ground truth on the sensor's scale (true joules x board gain); physical_j without the gain",
        }
        (out / "truth_summary.json").write_bytes(msgspec.json.encode(summary))


@dataclass
class _Req:
    id: str
    arrival_s: float
    prompt: int
    output: int
    stratum: str
    computed: int = 0
    generated: int = 0


def _arrivals(spec: WorkloadSpec, rng: np.random.Generator) -> list[_Req]:
    reqs, t = [], 0.0
    lo, hi = math.log(spec.prompt_min), math.log(spec.prompt_max)
    for i in range(spec.requests):
        t += rng.exponential(1.0 / spec.rate_rps)
        cycle = spec.busy_s + spec.quiet_s
        if spec.quiet_s > 0 and (t % cycle) > spec.busy_s:  # skip the quiet part of the cycle
            t += cycle - (t % cycle)
        prompt = int(round(math.exp(rng.uniform(lo, hi))))
        output = int(rng.integers(spec.output_min, spec.output_max + 1))
        reqs.append(_Req(f"req-{i:06d}", t, prompt, output, STRATA[int(rng.integers(len(STRATA)))]))
    return reqs


def step_duration_s(g: ModelGeometry, hw: HardwareProfile, flops: float, bytes_: float, tokens: int,
                    rng: np.random.Generator) -> float:
    """Roofline-style step time: compute and memory partly overlapped, plus launch overhead."""
    mfu = 0.70 * tokens / (tokens + 96.0)
    t_c = flops / (hw.peak_flops * max(mfu, 1e-3))
    t_m = bytes_ / (0.8 * hw.peak_bandwidth_bytes_s)
    return (max(t_c, t_m) + 0.25 * min(t_c, t_m) + 0.8e-3) * float(rng.lognormal(0.0, 0.03))


def simulate(g: ModelGeometry, hw: HardwareProfile, spec: WorkloadSpec, *, n_devices: int = 1,
             poll_hz: float = 50.0, twin: GpuTwin | None = None, poll_schedule: str = "locked", record_lead_s: float | None = None) -> SimResult:
    """Run the workload on the twin; return steps, energy samples and ground truth.

    ``record_lead_s``: the poller starts this long before the first step (recording starts with the
    workload); by default one second before the first arrival."""
    rng = np.random.default_rng(spec.seed)
    twin = twin or GpuTwin(hw)
    k_tok = g.kv_bytes_per_token
    reqs = _arrivals(spec, rng)
    pending = deque(reqs)
    running: list[_Req] = []
    truth = {r.id: TruthRequest(r.id, prompt_tokens=r.prompt, stratum=r.stratum) for r in reqs}
    t_begin = reqs[0].arrival_s - 1.0
    traces = [PowerTrace(t_begin - 3600.0, hw.idle_power_w) for _ in range(n_devices)]
    steps: list[StepRecord] = []
    step_true = []
    t = reqs[0].arrival_s
    e_byte = hw.energy_per_byte_j
    while pending or running:
        if not running and pending and pending[0].arrival_s > t:
            t = pending[0].arrival_s
        while pending and pending[0].arrival_s <= t and len(running) < spec.max_seqs:
            running.append(pending.popleft())
        budget = spec.max_batched_tokens
        batch: list[tuple[_Req, int, bool]] = []
        for r in running:
            if budget <= 0:
                break
            prefill = r.computed < r.prompt
            n = min(r.prompt - r.computed, budget) if prefill else 1
            budget -= n
            batch.append((r, n, prefill))
        if not batch:
            continue
        new = np.array([n for _, n, _ in batch], dtype=float)
        ctx = np.array([r.computed for r, _, _ in batch], dtype=float)
        T_step = new.sum()
        flops_r = cm.request_flops(g, new, ctx)
        kv_r = k_tok * (ctx + new)
        F, B = float(flops_r.sum()), float(kv_r.sum() + g.weight_bytes)
        dt = step_duration_s(g, hw, F / n_devices, B / n_devices, int(T_step), rng)
        dt, power, e_flop = twin.step(F / n_devices, B / n_devices, dt)
        t0, t1 = t, t + dt
        for tr in traces:
            twin.append_busy(tr, t0, t1, power)
        # ground truth: the step's true energy split by the v1 convention with the step's true coefficients;
        # its KV part by v2: the true dynamic energy (power above static) in proportion to the KV traffic
        phys = power * dt * n_devices
        sensor_j = phys  # scaled by gains below, once they are drawn
        d_r = e_flop * flops_r + e_byte * kv_r + e_byte * g.weight_bytes * new / T_step
        share = phys * d_r / d_r.sum()
        dynamic = max(phys - twin.profile.static_power_w * dt * n_devices, 0.0)
        kv_share = dynamic * (e_byte * kv_r) / d_r.sum()
        entries = []
        for (r, n, prefill), sj, kj in zip(batch, share, kv_share):
            tr_ = truth[r.id]
            tr_.physical_j += sj
            tr_.kv_j += kj
            if prefill:
                tr_.prefill_j += sj
            else:
                tr_.decode_j += sj
            first = r.computed == 0  # the stratum is named on a request's first entry only
            entries.append(RequestEntry(r.id, n if prefill else 0, 0 if prefill else n, r.computed,
                                        r.stratum if first else None, r.prompt if first else None))
            r.computed += n
            if r.computed >= r.prompt:
                r.generated += 1
                if r.generated >= r.output:
                    entries[-1].finished = True
        step_true.append(sensor_j)
        steps.append(StepRecord(len(steps), t0, t1, entries))
        running = [r for r in running if r.generated < r.output]
        t = t1 + float(rng.uniform(0.1e-3, 0.6e-3))  # scheduler/CPU gap between steps
    t_end = steps[-1].t_end + 1.0

    # the sensor: each device has its own gain, latency and publish phase; a poller reads it at poll_hz,
    # locked onto the counter's republication (the sampler's schedule) unless poll_schedule="uniform"
    energy: list[EnergySample] = []
    gains, measured, physical = [], 0.0, 0.0
    polls = poll_times(t_begin, t_end, poll_hz, rng)  # drawn either way: the same random stream after it
    pubs, values = [], []
    for tr in traces:
        fx = SensorEffects.realistic(rng)
        pub = fx.publish_times(t_begin - 0.5, t_end + 0.5, rng)
        pubs.append(pub)
        values.append(fx.counter_values_j(tr, pub))
        gains.append(fx.gain)
        physical += float(tr.energy_until(t_end) - tr.energy_until(t_begin))
    t_rec = t_begin if record_lead_s is None else max(steps[0].t_start - record_lead_s, t_begin)
    if poll_schedule == "uniform":
        polls = polls[polls >= t_rec]
        seen_all = np.column_stack([poll_counter(p, v, polls) for p, v in zip(pubs, values)])
    elif poll_schedule == "locked":
        period = 1.0 / poll_hz
        wake_s = (polls - (t_begin + np.arange(len(polls)) * period)) * (WAKE_UP_S / (0.1 * period))
        polls, seen_all = follow(PollSchedule(poll_hz), pubs, values, t_rec, t_end, wake_s)
    else:
        raise ValueError(f"poll_schedule must be locked or uniform, got {poll_schedule!r}")
    per_dev = list(seen_all.T)
    measured = float(sum(seen[-1] - seen[0] for seen in per_dev))
    for i, tp in enumerate(polls.tolist()):
        for d in range(n_devices):
            energy.append(EnergySample(tp, d, float(per_dev[d][i]), "simulated"))
    mean_gain = float(np.mean(gains))
    for tr_ in truth.values():
        tr_.energy_j = tr_.physical_j * mean_gain
        tr_.prefill_j *= mean_gain
        tr_.decode_j *= mean_gain
        tr_.kv_j *= mean_gain
    for r in reqs:
        truth[r.id].output_tokens = r.generated
    step_true_arr = np.asarray(step_true) * mean_gain
    # true idle: energy between steps (and before/after them) over the polled span
    idle = 0.0
    starts = np.array([s.t_start for s in steps])
    ends = np.array([s.t_end for s in steps])
    for tr, gain in zip(traces, gains):
        busy = float((tr.energy_until(ends) - tr.energy_until(starts)).sum())
        idle += gain * (float(tr.energy_until(t_end) - tr.energy_until(t_begin)) - busy)
    return SimResult(steps, energy, truth, idle, step_true_arr, measured, physical, gains, traces)
