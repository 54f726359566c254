"""The calibration plan: which kernel runs, at which sizes, how often, and for how many launches.

Every buffer is many times an H100's 50 MiB L2, so repeated launches stream from DRAM; launches take
milliseconds to a fraction of a second. The work of one launch comes from the kernels' analytic counts
(:mod:`wattprint.kernels`); nothing here imports torch or triton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wattprint.kernels import KernelWork
from wattprint.kernels.compute import compute_work
from wattprint.kernels.intensity import intensity_work, nominal_intensity
from wattprint.kernels.kv_gather import kv_gather_work
from wattprint.kernels.stream import stream_copy_work, stream_sum_work

if TYPE_CHECKING:
    import numpy as np

DEFAULT_SECONDS = 5.0
DEFAULT_RISE_S = 1.0  # power settles within a few hundred ms of a kernel starting; discard 1 s
MIN_LAUNCHES = 32

STREAM_SUM_ELEMENTS = 1 << 28  # float32: 1 GiB
STREAM_COPY_ELEMENTS = 1 << 29  # bfloat16: 1 GiB read, 1 GiB written
STREAM_BLOCK = 4096
COMPUTE_TILE = (128, 128, 64)  # BM, BN, BK (bf16)
COMPUTE_REPEATS = 8192  # ~2e12 FLOPs per launch at 132 programs; ~1.7e5 FLOP per DRAM byte
INTENSITY_TILE = (64, 32, 64)  # BM, BN, BK (bf16): intensity ≈ 32·repeats FLOP/B
INTENSITY_TILES = 1 << 16  # 512 MiB of bf16 tiles
INTENSITY_REPEATS = (1, 2, 4, 8, 16, 32)
KV_GEOMETRY = {"num_heads": 32, "num_kv_heads": 8, "head_size": 128, "block_size": 16}  # Llama-3-8B-like
KV_CONTEXTS = (256, 1024, 4096, 16384)
KV_BYTES_PER_LAUNCH = 512 << 20
BF16 = 2


@dataclass(frozen=True)
class RunSpec:
    """One run of the plan: a kernel configuration and the work of one launch."""

    kernel: str  # stream_sum, stream_copy, compute, intensity, kv_gather
    label: str
    params: dict = field(hash=False)
    work: KernelWork
    trial: int = 0


def build_plan(n_sm: int = 132, trials: int = 2, rng: np.random.Generator | None = None) -> list[RunSpec]:
    """The calibration runs for a GPU with ``n_sm`` SMs, ``trials`` of each, shuffled by ``rng``."""
    if n_sm <= 0 or trials <= 0:
        raise ValueError("n_sm and trials must be positive")
    configs: list[tuple[str, str, dict, KernelWork]] = []
    for progs in sorted({max(1, n_sm // 4), n_sm, 4 * n_sm}):
        params = {"n_elements": STREAM_SUM_ELEMENTS, "num_programs": progs, "block": STREAM_BLOCK}
        configs.append(("stream_sum", f"stream sum 1 GiB fp32, {progs} programs", params,
                        stream_sum_work(STREAM_SUM_ELEMENTS, 4, progs, STREAM_BLOCK)))
    for progs in sorted({n_sm, 4 * n_sm}):
        params = {"n_elements": STREAM_COPY_ELEMENTS, "num_programs": progs, "block": STREAM_BLOCK}
        configs.append(("stream_copy", f"stream copy 1 GiB bf16, {progs} programs", params,
                        stream_copy_work(STREAM_COPY_ELEMENTS, BF16, progs, STREAM_BLOCK)))
    bm, bn, bk = COMPUTE_TILE
    for progs in sorted({max(1, n_sm // 4), max(1, n_sm // 2), n_sm, 2 * n_sm}):
        params = {"num_programs": progs, "repeats": COMPUTE_REPEATS, "bm": bm, "bn": bn, "bk": bk}
        configs.append(("compute", f"compute tl.dot {bm}x{bn}x{bk}, {progs} programs", params,
                        compute_work(progs, COMPUTE_REPEATS, bm, bn, bk, BF16)))
    bm, bn, bk = INTENSITY_TILE
    for reps in INTENSITY_REPEATS:
        progs = 4 * n_sm
        params = {"n_tiles": INTENSITY_TILES, "num_programs": progs, "repeats": reps, "bm": bm, "bn": bn, "bk": bk}
        configs.append(("intensity", f"intensity ~{nominal_intensity(reps, bn, BF16):.0f} FLOP/B", params,
                        intensity_work(INTENSITY_TILES, progs, reps, bm, bn, bk, BF16)))
    g = KV_GEOMETRY
    token_bytes = 2 * g["num_kv_heads"] * g["head_size"] * BF16
    for ctx in KV_CONTEXTS:
        num_seqs = max(8, KV_BYTES_PER_LAUNCH // (ctx * token_bytes))
        for order in ("sequential", "random"):
            params = {"context": ctx, "num_seqs": num_seqs, "order": order, **g}
            work = kv_gather_work([ctx] * num_seqs, g["num_heads"], g["num_kv_heads"], g["head_size"],
                                  g["block_size"], BF16, q_element_size=BF16)
            configs.append(("kv_gather", f"kv gather ctx {ctx} x{num_seqs}, {order} pages", params, work))
    plan = [RunSpec(k, label, params, work, trial) for trial in range(trials) for k, label, params, work in configs]
    if rng is not None:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def launches_needed(launch_s: float, seconds: float, rise_s: float) -> int:
    """Launches for one run: at least ``seconds`` after the rise time, and at least 32 launches after it
    unless those would take longer than ``4·seconds``."""
    launch_s = max(launch_s, 1e-9)
    by_time = math.ceil((rise_s + seconds) / launch_s)
    by_count = math.ceil(rise_s / launch_s) + MIN_LAUNCHES
    return max(by_time, min(by_count, math.ceil((rise_s + 4 * seconds) / launch_s)), 2)
