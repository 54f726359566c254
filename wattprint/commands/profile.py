"""``wattprint profile``: run prompts through vLLM offline and attribute their energy.

The engine hook records every step; an in-process sidecar receives them while a meter is sampled.
Afterwards the trace is written (``steps.jsonl``, ``energy.jsonl``) and attributed offline, so that
``wattprint attribute`` on those two files reproduces ``requests.jsonl`` exactly.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import msgspec

from wattprint.errors import InputError
from wattprint.profiler.transport import messages as transport
from wattprint.profiler.core.records import EnergySample, RequestEntry, StepRecord, encode_line


class PromptSpec(msgspec.Struct, forbid_unknown_fields=False):
    id: str
    prompt: str
    max_tokens: int = 64
    stratum: str | None = None


def read_prompts(path: str | Path) -> list[PromptSpec]:
    """prompts.jsonl: ``{"id", "prompt", "max_tokens", "stratum"}`` a line; errors name file and line."""
    dec = msgspec.json.Decoder(PromptSpec)
    try:
        raw = Path(path).read_bytes().split(b"\n")
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from exc
    out, seen = [], set()
    for lineno, line in enumerate(raw, start=1):
        if not line.strip():
            continue
        try:
            p = dec.decode(line)
        except msgspec.DecodeError as exc:
            raise InputError(f"invalid prompt record: {exc}", str(path), lineno) from None
        if p.max_tokens <= 0:
            raise InputError(f"max_tokens must be positive, got {p.max_tokens}", str(path), lineno)
        if p.id in seen:
            raise InputError(f"duplicate prompt id {p.id!r}", str(path), lineno)
        seen.add(p.id)
        out.append(p)
    if not out:
        raise InputError("no prompts", str(path))
    return out


def _recording_sidecar_class():
    from wattprint.profiler.sidecar.daemon import Sidecar

    class RecordingSidecar(Sidecar):
        """The sidecar, also keeping every step record and meter reading (for the trace files)."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.recorded_steps: list[StepRecord] = []
            self.recorded_readings: list = []
            self.hello: transport.Hello | None = None
            self._rec_lock = threading.Lock()

        def _on_hello(self, hello):
            self.hello = hello
            super()._on_hello(hello)

        def _on_steps(self, msg):
            with self._rec_lock:
                self.recorded_steps.extend(msg.records)
            super()._on_steps(msg)

        def _on_reading(self, reading):
            with self._rec_lock:
                self.recorded_readings.append(reading)
            super()._on_reading(reading)

    return RecordingSidecar


def _wait_for_trace(sc, n_requests: int, timeout_s: float) -> None:
    """Until every request's last step has arrived and each counter has changed after the last step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sc._rec_lock:
            steps = list(sc.recorded_steps)
            readings = list(sc.recorded_readings)
        finished = sum(1 for s in steps for r in s.requests if r.finished)
        if steps and finished >= n_requests:
            t_last = steps[-1].t_end
            after = [r for r in readings if r.t_s > t_last]
            before = [r for r in readings if r.t_s <= t_last]
            if before and after and all(a != b for a, b in zip(after[-1].energy_j, before[-1].energy_j)) and \
                    len(after) > 1 and after[-1].energy_j != after[0].energy_j:
                return
        time.sleep(0.05)


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (config.json, weights, tokenizer)")
    p.add_argument("--prompts", required=True, help='prompts.jsonl: {"id","prompt","max_tokens","stratum"} a line')
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--meter", default="auto", choices=("auto", "nvml", "rapl", "cputime", "simulated"))
    p.add_argument("--hardware", help="hardware profile (default: from the meter)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens per prompt")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of GPU memory (on CPU: of RAM; default 0.25 there)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--seed", type=int, default=0)


def run_profile(args) -> int:
    from rich.console import Console

    from wattprint.files import atomic_write as _atomic_write
    from wattprint.exporters.report import print_report, source_note
    from wattprint.profiler.attribution.legacy import attribute
    from wattprint.profiler.core.costmodel import geometry_from_config
    from wattprint.profiler.core.hardware import load_profile
    from wattprint.profiler.meters.auto import open_meter
    from wattprint.commands.serve import has_nvidia_gpu
    from wattprint.profiler.vllm.offline import generate

    console = Console(stderr=True)
    prompts = read_prompts(args.prompts)
    model_dir = Path(args.model)
    geometry = geometry_from_config(model_dir)  # refuse what we cannot model before starting the engine
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meter = open_meter(args.meter)
    console.print(f"meter: {source_note(meter.source)}")
    sock_dir = tempfile.mkdtemp(prefix="wattprint-")
    sock = os.path.join(sock_dir, "sidecar.sock")
    sc = _recording_sidecar_class()(meter, socket_path=sock, metrics_port=None, hardware=args.hardware)
    hw = sc.profile if args.hardware is None else load_profile(args.hardware)
    engine = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
              "gpu_memory_utilization": args.gpu_memory_utilization or (0.9 if has_nvidia_gpu() else 0.25),
              "enforce_eager": args.enforce_eager}
    if args.max_num_batched_tokens:
        engine["max_num_batched_tokens"] = args.max_num_batched_tokens
    old_env = os.environ.get(transport.ENV_SIDECAR)
    os.environ[transport.ENV_SIDECAR] = sock
    sc.start()
    try:
        with console.status(f"generating {len(prompts)} prompts with vLLM ..."):
            gens = generate(str(model_dir), prompts, ignore_eos=args.ignore_eos, engine_kwargs=engine, seed=args.seed)
        with console.status("waiting for the last steps and counter updates ..."):
            _wait_for_trace(sc, len(prompts), timeout_s=15.0)
    finally:
        sc.stop()
        if old_env is None:
            os.environ.pop(transport.ENV_SIDECAR, None)
        else:
            os.environ[transport.ENV_SIDECAR] = old_env
    by_vllm_id = {g.request_id: g for g in gens}
    steps = [StepRecord(s.step, s.t_start, s.t_end, [
        RequestEntry(by_vllm_id[r.id].prompt_id if r.id in by_vllm_id else r.id, r.prefill_tokens, r.decode_tokens,
                     r.context_tokens, r.stratum, r.prompt_tokens, r.finished) for r in s.requests], s.model)
        for s in sc.recorded_steps]
    samples = [EnergySample(r.t_s, d, e, meter.source) for r in sc.recorded_readings for d, e in enumerate(r.energy_j)]
    _atomic_write(out / "steps.jsonl", b"".join(encode_line(s) for s in steps))
    _atomic_write(out / "energy.jsonl", b"".join(encode_line(e) for e in samples))
    model_name = geometry.name  # the name `wattprint attribute` gives the same config, so its output matches
    result = attribute(steps, samples, geometry, hw, source=meter.source, model_name=model_name,
                       energy_path=str(out / "energy.jsonl"))
    vllm_tokens = {g.prompt_id: g.output_tokens for g in gens}
    mismatched = [r.id for r in result.requests if r.id in vllm_tokens and r.output_tokens != vllm_tokens[r.id]]
    if mismatched:
        console.print(f"[yellow]warning: output tokens of {len(mismatched)} request(s) differ from vLLM's count")
    enc = msgspec.json.Encoder()
    _atomic_write(out / "requests.jsonl", b"".join(enc.encode(r) + b"\n" for r in result.requests))
    summary = msgspec.to_builtins(result.totals)
    summary.update(model=model_name, model_config=str(model_dir / "config.json"), model_geometry=geometry.to_dict(),
                   hardware=hw.name, meter=meter.source, prompts=len(prompts),
                   conservation_error=abs(result.totals.attributed_j + result.totals.idle_j - result.totals.measured_j)
                   / max(result.totals.measured_j, 1e-300))
    _atomic_write(out / "summary.json", msgspec.json.format(msgspec.json.encode(summary), indent=2) + b"\n")
    _atomic_write(out / "metrics.prom", render_offline_exposition(result.totals, result.requests, model_name,
                                                                  device_names=sc.device_names))
    print_report(result.requests, result.totals, limit=20)
    console.print(f"wrote {out}/requests.jsonl steps.jsonl energy.jsonl summary.json metrics.prom")
    return 0


def render_offline_exposition(totals, results, model: str, device_names: list[str]) -> bytes:
    """The Prometheus exposition of an offline attribution (same metrics as the sidecar's /metrics)."""
    from prometheus_client import generate_latest

    from wattprint.exporters.histograms import ENERGY_PER_TOKEN_BUCKETS_J, REQUEST_ENERGY_BUCKETS_J, HistogramState
    from wattprint.exporters.prometheus import MetricsSnapshot, make_registry
    from wattprint.profiler.core.strata import normalize

    counts, energy, per_token = {}, {}, {}
    for r in results:
        key = (model, normalize(r.stratum))
        counts[key] = counts.get(key, 0) + 1
        energy.setdefault(key, HistogramState(REQUEST_ENERGY_BUCKETS_J)).observe(r.energy_j, r.id)
        if r.output_tokens:
            per_token.setdefault(key, HistogramState(ENERGY_PER_TOKEN_BUCKETS_J)).observe(
                r.energy_j / r.output_tokens, r.id)
    snap = MetricsSnapshot(source=totals.source, device_names=list(device_names), model_totals={model: totals},
                           coefficients=dict(totals.coefficients or {}), requests=counts, request_energy=energy,
                           energy_per_token=per_token, steps=totals.steps)
    return generate_latest(make_registry(lambda: snap))


add_arguments = add_profile_arguments
run = run_profile
