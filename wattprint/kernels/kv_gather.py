"""Paged KV-cache gather: decode attention over K and V pages found through a block table.

Layout (vLLM's paged KV cache, as its attention kernels see it):

* ``key_cache`` and ``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_size]``, any strides
  with a unit stride on ``head_size``. This is what vLLM 0.32's Triton backend passes to
  ``unified_attention``: the layer's cache has the logical shape
  ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (K and V side by side in the last axis),
  stored by default in the ``NHD`` order (``KVCacheLayout.LBNHC``: physically
  ``[num_blocks, block_size, num_kv_heads, 2 * head_size]``), and the backend takes
  ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``. :func:`allocate_vllm_kv_cache` allocates one
  layer that way and :func:`split_vllm_kv_cache` makes the two views; separate contiguous K and V
  tensors (older vLLM's FlashAttention layout) work too.
* ``block_table``: int32 ``[num_seqs, max_blocks_per_seq]``: token ``i`` of sequence ``s`` lives in
  block ``block_table[s, i // block_size]``, slot ``i % block_size``.
* ``seq_lens``: int32 ``[num_seqs]``, each at least 1.
* ``query``: ``[num_seqs, num_heads, head_size]`` (one decode token per sequence), grouped-query
  attention with ``num_heads`` a multiple of ``num_kv_heads``.

One program per (sequence, KV head) walks the sequence's pages in block-table order, computes the
scores ``q·k`` of the ``num_heads / num_kv_heads`` query heads that share the KV head, and keeps an
online softmax and the weighted ``V`` sum (flash-decoding without the split over the context).
Output: ``[num_seqs, num_heads, head_size]`` float32, equal to
``softmax(q·Kᵀ·scale)·V`` per sequence and head.

Counts (:func:`kv_gather_work`): ``flops = 4·head_size·num_heads·Σ seq_len`` (``q·k`` and ``p·v``, 2
FLOPs per multiply-add); ``aux_flops`` = 5 per (query head, token) for the softmax (scale, running max,
subtract, exp, sum); ``kv_bytes`` = K and V of every valid token and KV head, read once; ``dram_bytes``
= the query, the block-table entries and sequence lengths read and the output written (KV excluded).
Slots past the end of a sequence in its last page are masked: neither read nor counted.
"""

from __future__ import annotations

from collections.abc import Sequence

from wattprint.kernels import KernelWork, cdiv, jit_kernel

#: triton.language, bound by :func:`wattprint.kernels.jit_kernel` at the first launch: importing this
#: module (for the analytic counts) never imports triton.
tl = None

#: softmax work per (query head, token) outside ``flops``: scale, max, subtract, exp, sum
SOFTMAX_OPS_PER_SCORE = 5


def kv_gather_work(seq_lens: Sequence[int], num_heads: int, num_kv_heads: int, head_size: int,
                   block_size: int, kv_element_size: int, q_element_size: int = 2,
                   out_element_size: int = 4) -> KernelWork:
    """One launch of :func:`paged_decode_attention` over sequences of the given lengths."""
    lens = [int(n) for n in seq_lens]
    if not lens or min(lens) < 1:
        raise ValueError("every sequence needs at least one token")
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    tokens = sum(lens)
    pages = sum(cdiv(n, block_size) for n in lens)
    n = len(lens)
    return KernelWork(
        flops=4 * head_size * num_heads * tokens,
        dram_bytes=n * num_heads * head_size * (q_element_size + out_element_size) + 4 * pages + 4 * n,
        kv_bytes=2 * tokens * num_kv_heads * head_size * kv_element_size,
        aux_flops=SOFTMAX_OPS_PER_SCORE * num_heads * tokens,
    )


# ----------------------------------------------------------------------------------- cache helpers
def allocate_vllm_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, dtype,
                           device="cpu"):
    """One layer's KV cache as vLLM 0.32 allocates it by default (NHD / ``LBNHC``): the logical
    ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` tensor over physically
    ``[num_blocks, block_size, num_kv_heads, 2 * head_size]`` storage."""
    import torch

    phys = torch.empty((num_blocks, block_size, num_kv_heads, 2 * head_size), dtype=dtype, device=device)
    return phys.transpose(1, 2)


def split_vllm_kv_cache(kv_cache, head_size: int):
    """``(key_cache, value_cache)``, each ``[num_blocks, block_size, num_kv_heads, head_size]``, from a
    logical ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` layer cache, exactly as vLLM's
    Triton attention backend does (``kv_cache.transpose(1, 2).split(head_size, dim=-1)``)."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


def make_block_table(seq_lens: Sequence[int], block_size: int, num_blocks: int | None = None,
                     order: str = "sequential", generator=None):
    """An int32 block table for the given sequence lengths.

    ``order="sequential"``: sequences take consecutive blocks. ``order="random"``: every page is a
    block drawn at random without replacement from ``num_blocks`` (default: exactly enough), so pages
    are scattered over the cache as after a long serving session. Returns ``(block_table, used)``
    where ``used`` is the number of distinct blocks referenced.
    """
    import torch

    pages = [cdiv(int(n), block_size) for n in seq_lens]
    total = sum(pages)
    num_blocks = total if num_blocks is None else num_blocks
    if num_blocks < total:
        raise ValueError(f"{total} pages do not fit in {num_blocks} blocks")
    if order == "sequential":
        ids = torch.arange(total, dtype=torch.int32)
    elif order == "random":
        ids = torch.randperm(num_blocks, generator=generator)[:total].to(torch.int32)
    else:
        raise ValueError(f"unknown page order {order!r} (sequential or random)")
    table = torch.zeros((len(pages), max(pages)), dtype=torch.int32)
    start = 0
    for s, n in enumerate(pages):
        table[s, :n] = ids[start:start + n]
        start += n
    return table, total


# ------------------------------------------------------------------------------------------ kernel
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, scale,
    stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bts, stride_os, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    gmask = g < GROUP
    heads = kvh * GROUP + g
    d = tl.arange(0, HEAD_SIZE)
    slot = tl.arange(0, BLOCK_SIZE)
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    q = q.to(tl.float32) * scale
    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    lsum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_SIZE], dtype=tl.float32)
    n_pages = tl.cdiv(seq_len, BLOCK_SIZE)
    for page in range(n_pages):
        blk = tl.cast(tl.load(bt_ptr + seq * stride_bts + page), tl.int64)
        tmask = page * BLOCK_SIZE + slot < seq_len
        k = tl.load(k_ptr + blk * stride_kb + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=tmask[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + blk * stride_vb + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                    mask=tmask[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_PAD, BLOCK_SIZE]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / lsum[:, None]
    tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :], out, mask=gmask[:, None])


def paged_decode_attention(query, key_cache, value_cache, block_table, seq_lens, scale: float | None = None,
                           out=None):
    """Decode attention of one token per sequence over a paged KV cache (layout: module docstring).

    Returns ``out`` ``[num_seqs, num_heads, head_size]`` float32.
    """
    import torch

    num_seqs, num_heads, head_size = query.shape
    num_blocks, block_size, num_kv_heads, hs = key_cache.shape
    if hs != head_size or value_cache.shape != key_cache.shape:
        raise ValueError("key_cache and value_cache must be [num_blocks, block_size, num_kv_heads, head_size]")
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    if query.stride(2) != 1 or key_cache.stride(3) != 1 or value_cache.stride(3) != 1:
        raise ValueError("the head_size axis must have unit stride")
    if block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32 or block_table.stride(1) != 1:
        raise ValueError("block_table and seq_lens must be int32 (block_table row-major)")
    if block_size & (block_size - 1) or head_size & (head_size - 1):
        raise ValueError("block_size and head_size must be powers of two")
    group = num_heads // num_kv_heads
    if scale is None:
        scale = head_size ** -0.5
    if out is None:
        out = torch.empty((num_seqs, num_heads, head_size), dtype=torch.float32, device=query.device)
    kernel = jit_kernel(_paged_decode_kernel)
    kernel[(num_seqs, num_kv_heads)](
        query, key_cache, value_cache, block_table, seq_lens, out, float(scale),
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(1, 1 << (group - 1).bit_length()), BLOCK_SIZE=block_size,
        HEAD_SIZE=head_size, num_warps=4,
    )
    return out


def reference_decode_attention(query, key_cache, value_cache, block_table, seq_lens, scale: float | None = None):
    """The same result with torch matmuls, sequence by sequence (for tests and FLOP counting)."""
    import torch

    num_seqs, num_heads, head_size = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    scale = head_size ** -0.5 if scale is None else scale
    outs = []
    for s in range(num_seqs):
        n = int(seq_lens[s])
        blocks = block_table[s, : cdiv(n, block_size)].long()
        k = key_cache[blocks].reshape(-1, num_kv_heads, head_size)[:n].float()  # [n, kvh, d]
        v = value_cache[blocks].reshape(-1, num_kv_heads, head_size)[:n].float()
        k = k.permute(1, 0, 2).repeat_interleave(group, dim=0)  # [heads, n, d]
        v = v.permute(1, 0, 2).repeat_interleave(group, dim=0)
        q = query[s].float().unsqueeze(1)  # [heads, 1, d]
        p = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * scale, dim=-1)
        outs.append(torch.bmm(p, v).squeeze(1))
    return torch.stack(outs)
