"""Tunable arithmetic intensity: tiles streamed from DRAM, each multiplied ``repeats`` times by a
resident tile.

``a`` is ``[n_tiles, BM, BK]`` in DRAM, ``w`` one ``BK x BN`` tile that every program keeps in
registers. Program ``p`` walks tiles ``p, p + P, p + 2P, ...``; each tile is loaded once and
``acc += a[t] @ w`` is done ``repeats`` times; ``out[p] = repeats · Σ_t a[t] @ w`` (float32).

Intensity = FLOPs / DRAM bytes ≈ ``2·BN·repeats / element_size`` (exactly: :func:`intensity_work`):
``repeats = 0`` is a pure stream, large ``repeats`` approach the compute kernel. On an H100 (bf16,
``BN = 32``) the ridge point (≈ 295 FLOP/B) lies between ``repeats = 16`` and ``32``.
"""

from __future__ import annotations

from wattprint.kernels import KernelWork, jit_kernel

#: triton.language, bound by :func:`wattprint.kernels.jit_kernel` at the first launch: importing this
#: module (for the analytic counts) never imports triton.
tl = None


def intensity_work(n_tiles: int, num_programs: int, repeats: int, bm: int, bn: int, bk: int,
                   element_size: int) -> KernelWork:
    """One launch of :func:`intensity_dot`: ``2·BM·BN·BK·repeats`` FLOPs per tile; ``a`` and ``w``
    read once, one float32 ``BM x BN`` result per program written once."""
    if min(n_tiles, num_programs, bm, bn, bk) <= 0 or repeats < 0:
        raise ValueError("intensity kernel sizes must be positive")
    return KernelWork(
        flops=2 * bm * bn * bk * repeats * n_tiles,
        dram_bytes=(n_tiles * bm * bk + bk * bn) * element_size + num_programs * bm * bn * 4,
    )


def repeats_for_intensity(flops_per_byte: float, bn: int, element_size: int) -> int:
    """The ``repeats`` whose intensity is closest to ``flops_per_byte`` (ignoring the small terms)."""
    return max(0, int(round(flops_per_byte * element_size / (2 * bn))))


def nominal_intensity(repeats: int, bn: int, element_size: int) -> float:
    return 2 * bn * repeats / element_size if repeats else 0.0


def _intensity_kernel(a_ptr, w_ptr, out_ptr, n_tiles, repeats,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    w = tl.load(w_ptr + rk[:, None] * BN + rn[None, :])
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    tile = rm[:, None] * BK + rk[None, :]
    for t in tl.range(pid, n_tiles, nprog):
        a = tl.load(a_ptr + tl.cast(t, tl.int64) * (BM * BK) + tile)
        for _ in range(repeats):
            acc = tl.dot(a, w, acc)
    tl.store(out_ptr + pid * BM * BN + rm[:, None] * BN + rn[None, :], acc)


def intensity_dot(a, w, repeats: int, num_programs: int, out=None):
    """``out[p] = repeats · Σ_{t ≡ p mod P} a[t] @ w`` for ``a`` [n_tiles, BM, BK], ``w`` [BK, BN]
    (contiguous fp16/bf16). Returns ``out`` [num_programs, BM, BN] float32."""
    import torch

    if a.dim() != 3 or w.dim() != 2 or a.shape[2] != w.shape[0]:
        raise ValueError("intensity_dot needs a [n_tiles, BM, BK] and w [BK, BN]")
    if not (a.is_contiguous() and w.is_contiguous()):
        raise ValueError("intensity_dot needs contiguous tensors")
    n_tiles, bm, bk = a.shape
    bn = w.shape[1]
    if out is None:
        out = torch.empty((num_programs, bm, bn), dtype=torch.float32, device=a.device)
    kernel = jit_kernel(_intensity_kernel)
    kernel[(num_programs,)](a, w, out, n_tiles, int(repeats), BM=bm, BN=bn, BK=bk, num_warps=4)
    return out


__all__ = ["intensity_dot", "intensity_work", "nominal_intensity", "repeats_for_intensity"]
