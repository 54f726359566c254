"""Sizes of every check, per device and mode, and the workload sized from the engine's measured speed."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from gpuval.engine import Engine, Entry
from gpuval.probe import Probe
from gpuval.runner import record, work
from gpuval.schedule import Workload
from wattprint.profiler.core.costmodel import ModelGeometry, kv_read_bytes, kv_write_bytes, request_flops


@dataclass(frozen=True)
class Preset:
    chunk: int
    prompt_range: tuple[int, int]
    concurrency: int
    target_s: float  # each isolated phase at least this long (the mixed run is about twice)
    max_decode: int  # cap on a request's mean decode tokens
    kv_batch: int
    kv_contexts: tuple[int, int]
    kv_target_s: float
    kv_max_steps: int
    load_s: float  # counter vs power: matmul load
    idle_s: float
    policies: tuple[str, ...] = ("interleave", "chunked")

    @property
    def max_ctx(self) -> int:
        return max(self.prompt_range[1] + int(1.5 * self.max_decode) + 2, self.kv_contexts[1] + self.kv_max_steps + 2)

    @property
    def slots(self) -> int:
        return max(self.concurrency, self.kv_batch)


PRESETS = {
    # Llama-3.1-8B shape in bf16 on an H100/H200: ~4 minutes of engine runs
    ("nvml", False): Preset(1024, (256, 2048), 32, 10.0, 512, 32, (256, 4096), 4.0, 1200, 10.0, 5.0),
    ("nvml", True): Preset(1024, (256, 2048), 32, 3.0, 512, 32, (256, 4096), 2.0, 600, 3.0, 2.0),
    # the tiny fp32 model on a CPU with the simulated meter
    ("simulated", False): Preset(128, (32, 320), 8, 10.0, 256, 8, (32, 1024), 4.0, 1500, 10.0, 5.0),
    ("simulated", True): Preset(128, (32, 320), 8, 4.0, 256, 8, (32, 1024), 3.0, 800, 10.0, 5.0),
}


def _shapes(p: Preset) -> dict[str, list[Entry]]:
    ctx = sum(p.prompt_range) // 2
    return {"prefill": [Entry("w", 0, p.chunk, 0, True)],
            "decode": [Entry(f"w{i}", i, 1, ctx, False) for i in range(p.concurrency)],
            "decode_long": [Entry(f"w{i}", i, 1, p.kv_contexts[1], False) for i in range(p.kv_batch)]}


def _speed(g: ModelGeometry, p: Preset, best: dict[str, float]) -> dict:
    ctx = sum(p.prompt_range) // 2
    flops = float(request_flops(g, p.chunk, 0))
    dec_bytes = g.weight_bytes + p.concurrency * float(kv_read_bytes(g, ctx) + kv_write_bytes(g, 1))
    return {"prefill_step_s": best["prefill"], "decode_step_s": best["decode"], "decode_long_step_s": best["decode_long"],
            "s_per_prefill_token": best["prefill"] / p.chunk, "prefill_flops_s": flops / best["prefill"],
            "decode_bytes_s": dec_bytes / best["decode"]}


def measure_speed(engine: Engine, p: Preset, repeats: int = 4) -> dict:
    """Warm the engine up on the workload's shapes and time them (device-synchronised)."""
    best = {}
    for name, entries in _shapes(p).items():
        times = []
        for _ in range(repeats + 1):
            engine.sync()
            t0 = time.monotonic()
            engine.step(entries)
            engine.sync()
            times.append(time.monotonic() - t0)
        best[name] = min(times[1:])
    return _speed(engine.g, p, best) | {"clock": "real, device-synchronised"}


def simulated_speed(dev: Probe, g: ModelGeometry, p: Preset) -> dict:
    """The simulated device's step times for the same shapes (its roofline of the cost model's work)."""
    best = {name: dev.step_time_s(*work(record(0, entries, 0.0, 0.0, g.name), g))
            for name, entries in _shapes(p).items()}
    return _speed(g, p, best) | {"clock": "virtual (simulated device)"}


def warm_up(engine: Engine, p: Preset) -> None:
    for entries in _shapes(p).values():
        engine.step(entries)


def size_workload(p: Preset, speed: dict, policy: str, seed: int, target_s: float | None = None,
                  wave_s: float = 1.0) -> Workload:
    """Requests so that the isolated prefill and decode phases each last about ``target_s``; requests
    arrive in waves of about ``wave_s`` seconds on, ``wave_s`` off (0: steadily)."""
    target = target_s or p.target_s
    mean_prompt = sum(p.prompt_range) / 2
    t_prompt = mean_prompt * speed["s_per_prefill_token"]
    mean_dec = mean_prompt * speed["s_per_prefill_token"] * p.concurrency / speed["decode_step_s"]
    mean_dec = int(min(max(mean_dec, 8), p.max_decode))
    n = max(p.concurrency + 1, math.ceil(target / t_prompt))
    mean_step_s = 0.5 * (speed["prefill_step_s"] + speed["decode_step_s"])
    wave = max(5, round(wave_s / mean_step_s)) if wave_s > 0 else 0
    return Workload(requests=n, prompt_range=p.prompt_range, output_range=(max(1, mean_dec // 2), mean_dec * 3 // 2),
                    concurrency=p.concurrency, chunk=p.chunk, policy=policy, seed=seed, wave_steps=wave)


def kv_steps(p: Preset, speed: dict, target_s: float | None = None) -> int:
    return int(min(max(math.ceil((target_s or p.kv_target_s) / speed["decode_long_step_s"]), 20), p.kv_max_steps))


def geometry_summary(g: ModelGeometry) -> dict:
    return g.to_dict() | {"decoder_params": g.decoder_params, "weight_bytes": g.weight_bytes,
                          "kv_bytes_per_token": g.kv_bytes_per_token}
