"""Streaming kernels: read (sum-reduce) or copy a buffer many times the size of L2. Memory-bound.

Both are persistent: ``num_programs`` programs walk the buffer's tiles with a grid stride, so the
number of programs (how many SMs are kept busy) sets the achieved bandwidth without changing the
work. Calibration uses that to sample several power levels at the same arithmetic intensity.

``stream_sum(x)``: each program adds its tiles into a ``BLOCK``-wide float32 accumulator and writes one
partial sum; the launcher adds the ``num_programs`` partials on the host side of the kernel (torch).
``stream_copy(x, y)``: ``y[:] = x``.

The buffer length must be a multiple of ``BLOCK`` (no masked lanes, so the counts are exact).
"""

from __future__ import annotations

from wattprint.kernels import KernelWork, jit_kernel

#: triton.language, bound by :func:`wattprint.kernels.jit_kernel` at the first launch: importing this
#: module (for the analytic counts) never imports triton.
tl = None

DEFAULT_BLOCK = 4096


def stream_sum_work(n_elements: int, element_size: int, num_programs: int, block: int = DEFAULT_BLOCK) -> KernelWork:
    """One launch of :func:`stream_sum`.

    FLOPs: one add per element into the accumulator, then ``block - 1`` adds per program to reduce its
    accumulator. Bytes: the buffer read once, one float32 partial written per program.
    """
    _check(n_elements, block, num_programs)
    return KernelWork(
        flops=n_elements + num_programs * (block - 1),
        dram_bytes=n_elements * element_size + num_programs * 4,
    )


def stream_copy_work(n_elements: int, element_size: int, num_programs: int, block: int = DEFAULT_BLOCK) -> KernelWork:
    """One launch of :func:`stream_copy`: no FLOPs; the buffer read once and written once."""
    _check(n_elements, block, num_programs)
    return KernelWork(flops=0, dram_bytes=2 * n_elements * element_size)


def _check(n_elements: int, block: int, num_programs: int) -> None:
    if n_elements <= 0 or n_elements % block:
        raise ValueError(f"stream kernels need a positive multiple of BLOCK={block} elements, got {n_elements}")
    if num_programs <= 0:
        raise ValueError("num_programs must be positive")


# ------------------------------------------------------------------------------------------ kernels
def _stream_sum_kernel(x_ptr, partial_ptr, n_tiles, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for t in tl.range(pid, n_tiles, nprog):
        x = tl.load(x_ptr + tl.cast(t, tl.int64) * BLOCK + offs)
        acc += x.to(tl.float32)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


def _stream_copy_kernel(x_ptr, y_ptr, n_tiles, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    for t in tl.range(pid, n_tiles, nprog):
        base = tl.cast(t, tl.int64) * BLOCK
        tl.store(y_ptr + base + offs, tl.load(x_ptr + base + offs))


# ---------------------------------------------------------------------------------------- launchers
def stream_sum(x, num_programs: int, block: int = DEFAULT_BLOCK, partial=None, reduce: bool = True):
    """Sum of a contiguous tensor (a float32 scalar tensor). ``partial``: optional [num_programs] float32
    buffer for the per-program sums (reused across launches keeps allocations out of timed loops).
    ``reduce=False`` returns the partial sums without adding them (what the timed loop launches: the
    kernel alone, whose work :func:`stream_sum_work` counts)."""
    import torch

    flat = x.reshape(-1)
    if not flat.is_contiguous():
        raise ValueError("stream_sum needs a contiguous tensor")
    _check(flat.numel(), block, num_programs)
    if partial is None:
        partial = torch.empty(num_programs, dtype=torch.float32, device=x.device)
    kernel = jit_kernel(_stream_sum_kernel)
    kernel[(num_programs,)](flat, partial, flat.numel() // block, BLOCK=block, num_warps=8)
    return partial.sum() if reduce else partial


def stream_copy(x, y, num_programs: int, block: int = DEFAULT_BLOCK):
    """``y[:] = x`` for contiguous tensors of the same size and dtype. Returns ``y``."""
    xf, yf = x.reshape(-1), y.reshape(-1)
    if not (xf.is_contiguous() and yf.is_contiguous()) or xf.numel() != yf.numel() or x.dtype != y.dtype:
        raise ValueError("stream_copy needs two contiguous tensors of the same size and dtype")
    _check(xf.numel(), block, num_programs)
    kernel = jit_kernel(_stream_copy_kernel)
    kernel[(num_programs,)](xf, yf, xf.numel() // block, BLOCK=block, num_warps=8)
    return y
