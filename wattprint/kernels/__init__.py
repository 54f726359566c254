"""Triton calibration kernels, each with an exact analytic count of the work it does.

Four kernels, one module each:

* :mod:`~wattprint.kernels.stream` - streaming read (sum-reduce) and copy over a large buffer:
  memory-bound.
* :mod:`~wattprint.kernels.compute` - ``tl.dot`` on tiles that stay in registers, looped many
  times: compute-bound, negligible DRAM traffic.
* :mod:`~wattprint.kernels.intensity` - tiles streamed from DRAM, each multiplied ``repeats`` times by
  a resident tile: the arithmetic intensity (FLOPs per DRAM byte) is a parameter.
* :mod:`~wattprint.kernels.kv_gather` - paged decode attention: ``q·K`` and a softmax-weighted ``V``
  sum per sequence, K and V pages gathered through a block table in vLLM's layout.

Counting conventions (the same in every module; ``docs/calibration.md`` has the details):

* ``flops`` are *algorithmic* floating-point operations: a multiply-add is 2 FLOPs (the convention of
  ``torch.utils.flop_counter`` and of datasheet peaks); an add into an accumulator is 1. Redundant
  lanes of hardware reductions and index arithmetic are not counted. The decode-attention softmax
  (exp, max, rescaling) is reported separately as ``aux_flops`` and is not part of ``flops``.
* ``dram_bytes`` are the compulsory bytes: every distinct input byte the kernel needs read once, every
  output byte written once (re-reads that hit L2 are not counted). The KV-cache bytes of the paged
  gather are counted in ``kv_bytes`` and *not* in ``dram_bytes``, so the two are disjoint and the
  calibration fits an energy for each.

Importing this package or its modules imports neither torch nor triton: the analytic counts are pure
Python, so the simulated calibration runs anywhere. The launchers import torch and triton when called,
and the kernels are JIT-decorated on first use (:func:`jit_kernel`). Triton's interpreter
(``TRITON_INTERPRET=1``, CPU tensors) must be switched on before triton itself is first imported:
``triton.language`` decides at import whether its own helpers are interpreted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelWork:
    """What one launch of a kernel does: FLOPs, compulsory DRAM bytes and KV-cache bytes."""

    flops: int
    dram_bytes: int
    kv_bytes: int = 0
    aux_flops: int = 0  # elementwise work outside ``flops`` (softmax), for information

    def __add__(self, other: KernelWork) -> KernelWork:
        return KernelWork(
            self.flops + other.flops,
            self.dram_bytes + other.dram_bytes,
            self.kv_bytes + other.kv_bytes,
            self.aux_flops + other.aux_flops,
        )

    def scaled(self, n: int) -> KernelWork:
        """The work of ``n`` launches."""
        return KernelWork(self.flops * n, self.dram_bytes * n, self.kv_bytes * n, self.aux_flops * n)

    @property
    def total_bytes(self) -> int:
        return self.dram_bytes + self.kv_bytes

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved (DRAM and KV); ``inf`` for a kernel that moves nothing."""
        return self.flops / self.total_bytes if self.total_bytes else float("inf")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def require_triton():
    """Import triton and triton.language, with a clear ImportError when triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:
        raise ImportError(
            f"the calibration kernels need triton (pip install 'wattprint[kernels]'): {exc}"
        ) from exc
    return triton, tl


_JIT_CACHE: dict = {}


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET`` asks for triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def jit_kernel(fn):
    """``triton.jit(fn)``, made on first use and cached per interpreter mode.

    The kernels are plain module-level functions written in triton.language; decorating them lazily
    means the interpreter switch is read when a kernel is first launched, not when the module is
    imported.
    """
    triton, tl = require_triton()
    key = (fn, interpret_mode())
    kernel = _JIT_CACHE.get(key)
    if kernel is None:
        fn.__globals__["tl"] = tl  # the kernel modules leave ``tl`` unbound until now
        kernel = _JIT_CACHE[key] = triton.jit(fn)
    return kernel


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["KernelWork", "cdiv", "interpret_mode", "jit_kernel", "require_triton", "triton_available"]
