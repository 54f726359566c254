"""``wattprint profile``: run prompts through vLLM offline and attribute their energy.

The engine hook sends every step to an in-process sidecar, whose trace recorder keeps them and the meter's
readings. Afterwards the trace is written (``steps.jsonl``; ``energy.jsonl`` from 2 s before the first
step, not the engine's start-up) and attributed offline, so that ``wattprint attribute`` on those two files
reproduces ``requests.jsonl`` exactly.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import msgspec

from wattprint.commands.common import METER_CHOICES
from wattprint.errors import InputError
from wattprint.files import private_dir


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


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (config.json, weights, tokenizer)")
    p.add_argument("--prompts", required=True, help='prompts.jsonl: {"id","prompt","max_tokens","stratum"} a line')
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--meter", default="auto", choices=METER_CHOICES)
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

    from wattprint.commands.output import check_conservation, write_requests, write_summary
    from wattprint.commands.serve import has_nvidia_gpu
    from wattprint.commands.sidecar import close_meter
    from wattprint.exporters.report import print_report, source_note
    from wattprint.exporters.report_html import write_report
    from wattprint.files import atomic_write
    from wattprint.profiler.attribution.offline import attribute
    from wattprint.profiler.core.costmodel import geometry_from_config
    from wattprint.profiler.core.records import EnergySample, encode_line, step_line
    from wattprint.profiler.meters.auto import open_meter
    from wattprint.profiler.sidecar.daemon import Sidecar
    from wattprint.profiler.sidecar.recorder import TraceRecorder
    from wattprint.profiler.transport import messages as transport
    from wattprint.profiler.vllm.ids import strip_random_suffix
    from wattprint.profiler.vllm.offline import generate

    console = Console(stderr=True)
    prompts = read_prompts(args.prompts)
    model_dir = Path(args.model)
    geometry = geometry_from_config(model_dir)  # refuse what we cannot model before starting the engine
    out = private_dir(args.out)
    meter = open_meter(args.meter)
    console.print(f"meter: {source_note(meter.source)}")
    sock = os.path.join(tempfile.mkdtemp(prefix="wattprint-"), "sidecar.sock")
    recorder = TraceRecorder()
    # the sidecar feeds the simulated meter the engine's load; its own attribution is not used
    sc = Sidecar(meter, socket_path=sock, metrics_port=None, hardware=args.hardware, recorder=recorder)
    hw = sc.profile
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
            recorder.wait_complete(len(prompts), timeout_s=15.0)
    finally:
        sc.stop()
        close_meter(meter)
        if old_env is None:
            os.environ.pop(transport.ENV_SIDECAR, None)
        else:
            os.environ[transport.ENV_SIDECAR] = old_env
    # the trace names requests as prompts.jsonl does (the hook sends the engine's ids: LLM.generate's
    # request_id plus vLLM's random suffix on vLLM >= 0.11)
    prompt_ids = {g.request_id: g.prompt_id for g in gens}

    def named(rid: str) -> str:
        return prompt_ids.get(rid) or prompt_ids.get(strip_random_suffix(rid), rid)

    steps = [msgspec.structs.replace(s, requests=[msgspec.structs.replace(r, id=named(r.id))
                                                  for r in s.requests]) for s in recorder.steps()]
    # from 2 s before the first step: the engine's start-up is not part of the workload
    samples = [EnergySample(r.t_s, d, e, meter.source) for r in recorder.readings() for d, e in enumerate(r.energy_j)]
    atomic_write(out / "steps.jsonl", b"".join(map(step_line, steps)))
    atomic_write(out / "energy.jsonl", b"".join(encode_line(e) for e in samples))
    model_name = geometry.name  # the name `wattprint attribute` gives the same config, so its output matches
    result = attribute(steps, samples, geometry, hw, source=meter.source, model_name=model_name,
                       energy_path=str(out / "energy.jsonl"))
    vllm_tokens = {g.prompt_id: g.output_tokens for g in gens}
    mismatched = [r.id for r in result.requests if r.id in vllm_tokens and r.output_tokens != vllm_tokens[r.id]]
    if mismatched:
        console.print(f"[yellow]warning: output tokens of {len(mismatched)} request(s) differ from vLLM's count")
    check_conservation(result.totals, result.requests)  # a violation writes no results (the trace stays)
    write_requests(out / "requests.jsonl", result.requests)
    summary = write_summary(out / "summary.json", result.totals, model=model_name,
                  model_config=str((model_dir / "config.json").resolve()), model_geometry=geometry.to_dict(),
                  hardware=hw.name, meter=meter.source, prompts=len(prompts))
    atomic_write(out / "metrics.prom", render_offline_exposition(result.totals, result.requests, model_name,
                                                                 device_names=sc.device_names))
    report = write_report(out / "report.html", requests=result.requests, summary=summary, steps=steps,
                          attribution=result)
    print_report(result.requests, result.totals, limit=20)
    console.print(f"wrote {out}/requests.jsonl steps.jsonl energy.jsonl summary.json metrics.prom report.html")
    console.print(f"report: {report}")
    return 0


def render_offline_exposition(totals, results, model: str, device_names: list[str]) -> bytes:
    """The Prometheus exposition of an offline attribution (same metrics as the sidecar's /metrics)."""
    from prometheus_client import generate_latest

    from wattprint.exporters.prometheus import MetricsSnapshot, make_registry
    from wattprint.profiler.sidecar.sinks import RequestHistograms

    histograms = RequestHistograms(clock=lambda: None)
    for r in results:
        histograms.record(r if r.model == model else msgspec.structs.replace(r, model=model))
    counts, energy, per_token = histograms.copy()
    snap = MetricsSnapshot(source=totals.source, device_names=list(device_names), model_totals={model: totals},
                           coefficients=dict(totals.coefficients or {}), requests=counts, request_energy=energy,
                           energy_per_token=per_token, steps=totals.steps)
    return generate_latest(make_registry(lambda: snap))


add_arguments = add_profile_arguments
run = run_profile
