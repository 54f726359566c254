"""Compute-bound kernel: ``tl.dot`` on register-resident tiles, looped ``repeats`` times.

Program ``p`` loads its tile ``a[p]`` (``BM x BK``) and ``b[p]`` (``BK x BN``) once, then accumulates
``acc += a[p] @ b[p]`` ``repeats`` times on the tensor cores and stores ``c[p] = repeats · a[p] @ b[p]``
(float32). DRAM traffic is the tiles and the result, once: with ``repeats`` in the thousands it is
negligible next to the FLOPs (intensity ``2·BM·BN·BK·repeats / bytes``).

The number of programs sets how many SMs are busy, so calibration can sample several power levels
of the same pure-compute work.
"""

from __future__ import annotations

from wattprint.kernels import KernelWork, jit_kernel

#: triton.language, bound by :func:`wattprint.kernels.jit_kernel` at the first launch: importing this
#: module (for the analytic counts) never imports triton.
tl = None


def compute_work(num_programs: int, repeats: int, bm: int, bn: int, bk: int, element_size: int) -> KernelWork:
    """One launch of :func:`compute_dot`: ``2·BM·BN·BK`` FLOPs per dot per program; tiles read once,
    the float32 result written once."""
    if min(num_programs, bm, bn, bk) <= 0 or repeats < 0:
        raise ValueError("compute kernel sizes must be positive")
    return KernelWork(
        flops=2 * bm * bn * bk * repeats * num_programs,
        dram_bytes=num_programs * ((bm * bk + bk * bn) * element_size + bm * bn * 4),
    )


def _compute_kernel(a_ptr, b_ptr, c_ptr, repeats, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = tl.load(a_ptr + pid * BM * BK + rm[:, None] * BK + rk[None, :])
    b = tl.load(b_ptr + pid * BK * BN + rk[:, None] * BN + rn[None, :])
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for _ in range(repeats):
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + pid * BM * BN + rm[:, None] * BN + rn[None, :], acc)


def compute_dot(a, b, repeats: int, out=None):
    """``out[p] = repeats · a[p] @ b[p]`` for ``a`` [P, BM, BK] and ``b`` [P, BK, BN] (contiguous,
    fp16/bf16; tile sides at least 16, powers of two). Returns ``out`` [P, BM, BN] float32."""
    import torch

    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError("compute_dot needs a [P, BM, BK] and b [P, BK, BN]")
    if not (a.is_contiguous() and b.is_contiguous()):
        raise ValueError("compute_dot needs contiguous tiles")
    p, bm, bk = a.shape
    bn = b.shape[2]
    if out is None:
        out = torch.empty((p, bm, bn), dtype=torch.float32, device=a.device)
    kernel = jit_kernel(_compute_kernel)
    kernel[(p,)](a, b, out, int(repeats), BM=bm, BN=bn, BK=bk, num_warps=8 if bm * bn >= 128 * 128 else 4)
    return out
