"""Launchers of the calibration kernels on a torch device: one no-argument function per run of the
plan, with the buffers it launches on (:class:`~wattprint.profiler.calibrate.gpudevice.GpuDevice` calls
them back to back). torch comes from the caller; the kernel modules import triton when launched.
"""

from __future__ import annotations

from wattprint.kernels import compute, intensity, kv_gather, stream
from wattprint.profiler.calibrate.plan import RunSpec


def make_launcher(spec: RunSpec, torch, dev, gen):
    """A no-argument function launching the run's kernel once on torch device ``dev``, and the dict
    holding its buffers (cleared to free them)."""
    p = spec.params
    b: dict = {}
    bf16 = torch.bfloat16
    if spec.kernel == "stream_sum":
        b["x"] = torch.rand(p["n_elements"], device=dev, generator=gen)
        b["partial"] = torch.empty(p["num_programs"], device=dev)
        return (lambda: stream.stream_sum(b["x"], p["num_programs"], p["block"], partial=b["partial"],
                                          reduce=False)), b
    if spec.kernel == "stream_copy":
        b["x"] = torch.rand(p["n_elements"], device=dev, generator=gen).to(bf16)
        b["y"] = torch.empty_like(b["x"])
        return (lambda: stream.stream_copy(b["x"], b["y"], p["num_programs"], p["block"])), b
    if spec.kernel == "compute":
        P, bm, bn, bk = p["num_programs"], p["bm"], p["bn"], p["bk"]
        b["a"] = (torch.rand((P, bm, bk), device=dev, generator=gen) * 0.01).to(bf16)
        b["b"] = (torch.rand((P, bk, bn), device=dev, generator=gen) * 0.01).to(bf16)
        b["out"] = torch.empty((P, bm, bn), device=dev)
        return (lambda: compute.compute_dot(b["a"], b["b"], p["repeats"], out=b["out"])), b
    if spec.kernel == "intensity":
        bm, bn, bk = p["bm"], p["bn"], p["bk"]
        b["a"] = (torch.rand((p["n_tiles"], bm, bk), device=dev, generator=gen) * 0.01).to(bf16)
        b["w"] = (torch.rand((bk, bn), device=dev, generator=gen) * 0.01).to(bf16)
        b["out"] = torch.empty((p["num_programs"], bm, bn), device=dev)
        return (lambda: intensity.intensity_dot(b["a"], b["w"], p["repeats"], p["num_programs"],
                                                out=b["out"])), b
    if spec.kernel == "kv_gather":
        bs, kvh, hs, nh, ns, ctx = (p["block_size"], p["num_kv_heads"], p["head_size"], p["num_heads"],
                                    p["num_seqs"], p["context"])
        lens = [ctx] * ns
        table, used = kv_gather.make_block_table(lens, bs, order=p["order"],
                                                 generator=torch.Generator().manual_seed(ns * ctx))
        kv = kv_gather.allocate_vllm_kv_cache(used, bs, kvh, hs, bf16, dev)
        kv.normal_(generator=gen)
        b["kv"] = kv
        b["k"], b["v"] = kv_gather.split_vllm_kv_cache(kv, hs)
        b["q"] = torch.randn((ns, nh, hs), device=dev, generator=gen).to(bf16)
        b["table"] = table.to(dev)
        b["lens"] = torch.tensor(lens, dtype=torch.int32, device=dev)
        b["out"] = torch.empty((ns, nh, hs), device=dev)
        return (lambda: kv_gather.paged_decode_attention(b["q"], b["k"], b["v"], b["table"], b["lens"],
                                                         out=b["out"])), b
    raise ValueError(f"unknown kernel {spec.kernel!r}")
