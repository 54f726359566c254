"""Calibration kernels: results against torch references; FLOPs and DRAM bytes against the analytic counts.

Without a GPU the kernels run in triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors), which
``triton.language`` reads when it is first imported: this module switches it on just for that import and
for its own tests, and puts the environment back afterwards. Under the interpreter every load and store
is recorded, so the bytes a kernel touches are counted, not assumed. FLOPs are checked against
``torch.utils.flop_counter`` on the torch reference (matmul convention: a multiply-add is 2 FLOPs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.triton

_GPU = torch.cuda.is_available()
_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
# triton.language already imported without the interpreter (by an earlier test module): in-process
# interpreted launches cannot work any more, so the tests re-run this file in a fresh interpreter.
_TOO_LATE = not _GPU and "triton.language" in sys.modules and _OLD_INTERPRET != "1"
if not _GPU:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.language")  # imported now, while the interpreter is on
    from torch.utils.flop_counter import FlopCounterMode  # imports triton too
finally:
    if _OLD_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET

from wattprint.kernels import KernelWork  # noqa: E402
from wattprint.kernels.compute import compute_dot, compute_work  # noqa: E402
from wattprint.kernels.intensity import intensity_dot, intensity_work, repeats_for_intensity  # noqa: E402
from wattprint.kernels.kv_gather import (  # noqa: E402
    allocate_vllm_kv_cache,
    kv_gather_work,
    make_block_table,
    paged_decode_attention,
    reference_decode_attention,
    split_vllm_kv_cache,
)
from wattprint.kernels.stream import stream_copy, stream_copy_work, stream_sum, stream_sum_work  # noqa: E402

DEVICE = "cuda" if _GPU else "cpu"
in_process = pytest.mark.skipif(_TOO_LATE, reason="triton was imported before the interpreter could be "
                                "switched on: see test_kernels_in_a_fresh_process")
interpreted = pytest.mark.skipif(_GPU, reason="loads and stores are recorded only under the interpreter")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_on():
    """The interpreter for this module's tests only (kernels are JIT-decorated at their first launch)."""
    if _GPU:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.mark.skipif(not _TOO_LATE, reason="triton was imported here first: the tests run in this process")
def test_kernels_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]


# ----------------------------------------------------------------------------- memory recording
class MemoryTrace:
    """Every element address the interpreter loads or stores, with its size in bytes."""

    def __init__(self):
        self.loads: list[tuple[np.ndarray, int]] = []
        self.stores: list[tuple[np.ndarray, int]] = []

    @staticmethod
    def _bytes(records, lo=None, hi=None) -> np.ndarray:
        chunks = [(addrs[:, None] + np.arange(size, dtype=np.uint64)).ravel() for addrs, size in records]
        b = np.unique(np.concatenate(chunks)) if chunks else np.empty(0, dtype=np.uint64)
        if lo is not None:
            b = b[(b >= lo) & (b < hi)]
        return b

    def loaded(self, lo=None, hi=None) -> int:
        """Distinct bytes loaded (in ``[lo, hi)`` when given)."""
        return len(self._bytes(self.loads, lo, hi))

    def stored(self) -> int:
        return len(self._bytes(self.stores))

    def loaded_total(self) -> int:
        """Bytes loaded counting repeats (what the kernel asks of the memory system)."""
        return sum(len(a) * s for a, s in self.loads)


@pytest.fixture()
def memtrace(monkeypatch):
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    trace = MemoryTrace()
    real_load, real_store = builder.create_masked_load, builder.create_masked_store

    def record(into, ptrs, mask):
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        m = np.broadcast_to(mask.data, ptrs.data.shape)
        into.append((ptrs.data[m].astype(np.uint64).ravel(), size))

    def load(self, ptrs, mask, other, *args, **kwargs):
        record(trace.loads, ptrs, mask)
        return real_load(self, ptrs, mask, other, *args, **kwargs)

    def store(self, ptrs, value, mask, *args, **kwargs):
        record(trace.stores, ptrs, mask)
        return real_store(self, ptrs, value, mask, *args, **kwargs)

    monkeypatch.setattr(builder, "create_masked_load", load)
    monkeypatch.setattr(builder, "create_masked_store", store)
    return trace


def flops_of(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def gen(seed=0):
    return torch.Generator(device=DEVICE).manual_seed(seed)


# ------------------------------------------------------------------------------------------ stream
@in_process
@pytest.mark.parametrize("num_programs", [1, 3, 16])  # 16 programs for 12 tiles: some have none
def test_stream_sum(num_programs):
    block, tiles = 64, 12
    x = torch.randn(block * tiles, generator=gen(1), device=DEVICE)
    total = stream_sum(x, num_programs, block=block)
    assert total.item() == pytest.approx(x.double().sum().item(), abs=1e-3)
    partial = stream_sum(x, num_programs, block=block, reduce=False)
    tiles_x = x.view(tiles, block).double()
    for p in range(num_programs):
        assert partial[p].item() == pytest.approx(tiles_x[p::num_programs].sum().item(), abs=1e-4)


def test_stream_sum_flop_count_walks_the_grid_stride_loop():
    block, tiles, progs = 64, 12, 5
    adds = 0
    for p in range(progs):
        adds += block * len(range(p, tiles, progs))  # acc += x: one add per lane per tile
        adds += block - 1  # tl.sum over the accumulator
    assert stream_sum_work(block * tiles, 4, progs, block).flops == adds


@in_process
@interpreted
@pytest.mark.parametrize("num_programs", [2, 16])
def test_stream_kernels_touch_exactly_the_counted_bytes(memtrace, num_programs):
    block, n = 64, 64 * 12
    x = torch.randn(n, generator=gen(2))
    stream_sum(x, num_programs, block=block, reduce=False)
    work = stream_sum_work(n, 4, num_programs, block)
    assert memtrace.loaded() == x.nbytes and memtrace.loaded_total() == x.nbytes
    assert memtrace.loaded() + memtrace.stored() == work.dram_bytes

    memtrace.loads.clear()
    memtrace.stores.clear()
    xh = x.half()
    y = torch.empty_like(xh)
    stream_copy(xh, y, num_programs, block=block)
    assert torch.equal(xh, y)
    assert memtrace.loaded() + memtrace.stored() == stream_copy_work(n, 2, num_programs, block).dram_bytes
    assert stream_copy_work(n, 2, num_programs, block).flops == 0


def test_stream_rejects_partial_tiles():
    with pytest.raises(ValueError, match="multiple of BLOCK"):
        stream_sum_work(100, 4, 2, block=64)


# ----------------------------------------------------------------------------------------- compute
def _tiles(shape, dtype=torch.float16, seed=0):
    return (torch.rand(shape, generator=gen(seed), device=DEVICE) - 0.5).to(dtype)


@in_process
def test_compute_dot_matches_repeated_matmul_and_flop_count():
    p, bm, bn, bk, reps = 3, 16, 32, 16, 5
    a, b = _tiles((p, bm, bk), seed=3), _tiles((bk, bn), seed=4).expand(p, bk, bn).contiguous()
    out = compute_dot(a, b, reps)

    def reference():
        acc = torch.zeros((p, bm, bn), dtype=torch.float32, device=DEVICE)
        for _ in range(reps):  # the kernel's loop: one tile product per repeat
            acc = acc + torch.bmm(a.float(), b.float())
        return acc

    torch.testing.assert_close(out, reference(), rtol=1e-3, atol=1e-3)
    assert flops_of(reference) == compute_work(p, reps, bm, bn, bk, 2).flops


@in_process
@interpreted
def test_compute_dot_touches_only_its_tiles(memtrace):
    p, bm, bn, bk = 2, 16, 16, 32
    a, b = _tiles((p, bm, bk)), _tiles((p, bk, bn), seed=1)
    compute_dot(a, b, 7)
    work = compute_work(p, 7, bm, bn, bk, 2)
    assert memtrace.loaded() == a.nbytes + b.nbytes
    assert memtrace.stored() == p * bm * bn * 4
    assert memtrace.loaded() + memtrace.stored() == work.dram_bytes
    assert work.intensity == pytest.approx(work.flops / work.dram_bytes)


# --------------------------------------------------------------------------------------- intensity
@in_process
@pytest.mark.parametrize("repeats", [0, 1, 3])
def test_intensity_dot_matches_reference_and_flop_count(repeats):
    n_tiles, progs, bm, bn, bk = 7, 3, 16, 16, 32
    a, w = _tiles((n_tiles, bm, bk), seed=5), _tiles((bk, bn), seed=6)
    out = intensity_dot(a, w, repeats, progs)

    def reference():
        outs = []
        for p in range(progs):
            acc = torch.zeros((bm, bn), device=DEVICE)
            for t in range(p, n_tiles, progs):
                for _ in range(repeats):
                    acc = acc + torch.mm(a[t].float(), w.float())
            outs.append(acc)
        return torch.stack(outs)

    torch.testing.assert_close(out, reference(), rtol=1e-3, atol=1e-3)
    assert flops_of(reference) == intensity_work(n_tiles, progs, repeats, bm, bn, bk, 2).flops


@in_process
@interpreted
def test_intensity_dot_reads_each_tile_once(memtrace):
    n_tiles, progs, bm, bn, bk = 6, 4, 16, 16, 16
    a, w = _tiles((n_tiles, bm, bk)), _tiles((bk, bn), seed=1)
    intensity_dot(a, w, 4, progs)
    work = intensity_work(n_tiles, progs, 4, bm, bn, bk, 2)
    assert memtrace.loaded() + memtrace.stored() == work.dram_bytes
    # every program loads w; DRAM (compulsory) traffic counts it once
    assert memtrace.loaded_total() == a.nbytes + progs * w.nbytes


def test_intensity_is_tunable():
    works = [intensity_work(4096, 528, r, 64, 32, 64, 2) for r in (1, 4, 16, 64)]
    ratios = [w.intensity for w in works]
    assert ratios == sorted(ratios) and ratios[-1] / ratios[0] == pytest.approx(64, rel=0.01)
    assert repeats_for_intensity(295, 32, 2) == 9  # an H100's ridge point in bf16


# --------------------------------------------------------------------------------------- kv gather
def _kv_case(order, num_heads, num_kv_heads, lens, block_size=4, head_size=16, spare=5, seed=0):
    g = gen(seed)
    pages = sum(-(-n // block_size) for n in lens)
    kv = allocate_vllm_kv_cache(pages + spare, block_size, num_kv_heads, head_size, torch.float16, DEVICE)
    kv.copy_(torch.randn(kv.shape, generator=g, device=DEVICE).half())
    key_cache, value_cache = split_vllm_kv_cache(kv, head_size)
    table, _ = make_block_table(lens, block_size, pages + spare, order, torch.Generator().manual_seed(seed))
    q = torch.randn((len(lens), num_heads, head_size), generator=g, device=DEVICE).half()
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return kv, key_cache, value_cache, table.to(DEVICE), seq_lens, q


def test_vllm_layout_views():
    kv = allocate_vllm_kv_cache(10, 16, 8, 128, torch.bfloat16, "cpu")
    assert kv.shape == (10, 8, 16, 256)  # vLLM's logical [num_blocks, num_kv_heads, block_size, 2*head_size]
    assert kv.transpose(1, 2).is_contiguous()  # NHD storage: [num_blocks, block_size, num_kv_heads, 2*head]
    k, v = split_vllm_kv_cache(kv, 128)
    assert k.shape == v.shape == (10, 16, 8, 128)  # what vLLM's unified_attention receives
    assert v.data_ptr() - k.data_ptr() == 128 * 2  # V right after K for each (token, head)


@in_process
@pytest.mark.parametrize(("order", "num_heads", "num_kv_heads"),
                         [("sequential", 4, 4), ("random", 6, 2), ("random", 8, 1)])
@pytest.mark.parametrize("lens", [[1, 5, 16, 23], [40]])
def test_paged_decode_attention_matches_reference(order, num_heads, num_kv_heads, lens):
    _, k, v, table, seq_lens, q = _kv_case(order, num_heads, num_kv_heads, lens)
    out = paged_decode_attention(q, k, v, table, seq_lens)
    ref = reference_decode_attention(q, k, v, table, seq_lens)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    work = kv_gather_work(lens, num_heads, num_kv_heads, 16, 4, 2)
    assert flops_of(lambda: reference_decode_attention(q, k, v, table, seq_lens)) == work.flops


@in_process
@interpreted
@pytest.mark.parametrize("order", ["sequential", "random"])
def test_paged_decode_attention_touches_exactly_the_counted_bytes(memtrace, order):
    lens = [3, 8, 13]  # partial last pages: their empty slots are neither read nor counted
    num_heads, num_kv_heads, head_size, block_size = 6, 2, 16, 4
    kv, k, v, table, seq_lens, q = _kv_case(order, num_heads, num_kv_heads, lens, block_size, head_size)
    paged_decode_attention(q, k, v, table, seq_lens)
    work = kv_gather_work(lens, num_heads, num_kv_heads, head_size, block_size, kv_element_size=2,
                          q_element_size=2, out_element_size=4)
    lo = kv.data_ptr()
    hi = lo + kv.untyped_storage().nbytes()
    kv_read = memtrace.loaded(lo, hi)
    assert kv_read == work.kv_bytes
    assert memtrace.loaded() - kv_read + memtrace.stored() == work.dram_bytes
    # the KV bytes read are those of the valid tokens, wherever their pages are
    valid = sum(lens) * num_kv_heads * 2 * head_size * 2
    assert kv_read == valid


def test_kv_gather_work_counts():
    w = kv_gather_work([4096] * 16, 32, 8, 128, 16, 2)
    assert w.kv_bytes == 16 * 4096 * 4096  # 4 KiB per token and layer: 128 KiB over Llama-3-8B's 32 layers
    assert w.flops == 4 * 128 * 32 * 16 * 4096
    assert w.dram_bytes < w.kv_bytes / 100  # query, block table, lengths and output: small next to KV
    assert isinstance(w + w, KernelWork) and (w + w).kv_bytes == 2 * w.kv_bytes


# ----------------------------------------------------------------- the GPU calibration loop, on CPU
class FakeMeter:
    """A 100 W device whose counter republishes every 10 ms."""

    source = "fake"

    def __init__(self, power_w=100.0, period_s=0.01):
        from wattprint.profiler.meters.base import DeviceInfo

        self.power_w, self.period_s = power_w, period_s
        self.devices = [DeviceInfo(0, "fake gpu", {"tdp_w": 1000.0})]
        self.t0 = time.monotonic()

    def read(self):
        from wattprint.profiler.meters.base import Reading

        t = time.monotonic()
        published = np.floor((t - self.t0) / self.period_s) * self.period_s
        return Reading(t, (self.power_w * published,), self.source)

    def close(self):
        pass


def _tiny_plan():
    from wattprint.profiler.calibrate.plan import RunSpec

    kv = {"context": 8, "num_seqs": 2, "order": "random", "num_heads": 4, "num_kv_heads": 2, "head_size": 16,
          "block_size": 4}
    return [
        RunSpec("stream_sum", "sum", {"n_elements": 512, "num_programs": 2, "block": 64},
                stream_sum_work(512, 4, 2, 64)),
        RunSpec("stream_copy", "copy", {"n_elements": 512, "num_programs": 2, "block": 64},
                stream_copy_work(512, 2, 2, 64)),
        RunSpec("compute", "compute", {"num_programs": 2, "repeats": 2, "bm": 16, "bn": 16, "bk": 16},
                compute_work(2, 2, 16, 16, 16, 2)),
        RunSpec("intensity", "intensity", {"n_tiles": 4, "num_programs": 2, "repeats": 1, "bm": 16, "bn": 16,
                                           "bk": 16}, intensity_work(4, 2, 1, 16, 16, 16, 2)),
        RunSpec("kv_gather", "kv", kv, kv_gather_work([8, 8], 4, 2, 16, 4, 2)),
    ]


@in_process
def test_gpu_calibration_loop_with_a_fake_meter():
    """GpuDevice's launch loop, sampler thread and window analysis, with every kernel (tiny sizes)."""
    from wattprint.profiler.calibrate.gpudevice import GpuDevice
    from wattprint.profiler.calibrate.procedure import calibrate

    dev = GpuDevice(0, meter=FakeMeter(), torch_device=DEVICE)
    try:
        # windows long against the 10 ms republish period and against the sampler thread's stalls (the
        # Triton interpreter holds the GIL in this process), so that CI scheduling jitter stays small
        res = calibrate(dev, plan=_tiny_plan(), seconds=1.5, rise_s=0.1, cooldown_s=0.0, idle_s=0.5)
    finally:
        dev.close()
    assert res.idle_power_w == pytest.approx(100.0, rel=0.1)
    assert [r.spec.kernel for r in res.runs] == [s.kernel for s in _tiny_plan()]
    for r in res.runs:
        assert r.mean_power_w == pytest.approx(100.0, rel=0.15), r.spec.label
        assert 0 < r.flops + r.dram_bytes + r.kv_bytes
        launches = r.dram_bytes / r.spec.work.dram_bytes
        assert 0 < launches <= r.launches
    assert res.profile.fit["source"] == "nvml" and res.profile.fit["runs"] == 5
