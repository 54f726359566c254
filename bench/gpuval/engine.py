"""A small real inference engine in PyTorch: a random-weight Llama-geometry decoder with a KV cache.

One call of :meth:`Engine.step` runs one engine step over a batch of entries, as vLLM's model runner
does: prefill chunks (T prompt tokens on c cached ones, causal within the chunk) and decodes (one token
on c cached ones), all tokens through the same weight matrices at once, each request's attention over
its own slot of the KV cache, logits only for each entry's last token, greedy sampling. Weights are
random (no download); shapes, FLOPs and memory traffic are real.

The KV cache is one tensor per layer for K and one for V, ``(slots, n_kv, max_ctx, head_dim)``, filled
with random values at start so that decode steps that never had a prefill (isolation replays) read data
that looks like real activations. Grouped-query attention: the query heads of a KV head are folded into
the query length, so no K/V is copied per query head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wattprint.profiler.core.costmodel import ModelGeometry

#: a tiny Llama geometry for CPUs (fp32: CPUs have no fast bf16 matmul everywhere)
TINY_CPU_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 704, "num_attention_heads": 4, "num_hidden_layers": 4,
    "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 2048, "max_position_embeddings": 8192,
    "torch_dtype": "float32",
}


@dataclass(frozen=True)
class Entry:
    """One request's part in one step: ``tokens`` new tokens on ``context`` cached ones, in KV ``slot``."""

    rid: str
    slot: int
    tokens: int
    context: int
    prefill: bool  # a prompt chunk (else one decode token)
    prompt_tokens: int = 0
    last: bool = False  # the request's last step


class Engine:
    """Random-weight Llama decoder with a slot-per-request KV cache on ``device``."""

    def __init__(self, g: ModelGeometry, device: str, slots: int, max_ctx: int, seed: int = 0):
        self.g = g
        self.device = torch.device(device)
        self.dtype = {2: torch.bfloat16, 4: torch.float32}[g.dtype_bytes]
        self.slots, self.max_ctx = slots, max_ctx
        gen = torch.Generator(device=self.device).manual_seed(seed)
        L, h, nq, nkv, d, inter = g.layers, g.hidden, g.heads, g.kv_heads, g.head_dim, g.intermediate

        def rand(*shape, scale=0.02):
            t = torch.empty(*shape, device=self.device, dtype=self.dtype)
            return t.normal_(0.0, scale, generator=gen)

        self.embed = rand(g.vocab, h)
        self.lm_head = rand(h, g.vocab, scale=h ** -0.5)
        self.norm = torch.ones(h, device=self.device, dtype=self.dtype)
        self.layers = [
            {"wqkv": rand(h, (nq + 2 * nkv) * d, scale=h ** -0.5), "wo": rand(nq * d, h, scale=(nq * d) ** -0.5),
             "wgu": rand(h, 2 * inter, scale=h ** -0.5), "wdown": rand(inter, h, scale=inter ** -0.5),
             "n1": torch.ones(h, device=self.device, dtype=self.dtype),
             "n2": torch.ones(h, device=self.device, dtype=self.dtype)}
            for _ in range(L)
        ]
        shape = (slots, nkv, max_ctx, d)
        self.k_cache = [rand(*shape, scale=1.0) for _ in range(L)]
        self.v_cache = [rand(*shape, scale=1.0) for _ in range(L)]
        inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=self.device, dtype=torch.float32) / d))
        ang = torch.outer(torch.arange(max_ctx, device=self.device, dtype=torch.float32), inv)
        self.cos, self.sin = ang.cos().to(self.dtype), ang.sin().to(self.dtype)
        self.last_token = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._prompt_gen = torch.Generator(device="cpu").manual_seed(seed + 1)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- one step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, entries: list[Entry]) -> None:
        """Run one engine step (asynchronously on a GPU: call :meth:`sync` to wait for it)."""
        g, dev = self.g, self.device
        pre = [e for e in entries if e.prefill]
        dec = [e for e in entries if not e.prefill]
        if any(e.context + e.tokens > self.max_ctx for e in entries):
            raise ValueError("an entry exceeds the KV cache's max_ctx")
        ids, pos = [], []
        for e in pre:
            ids.append(torch.randint(0, g.vocab, (e.tokens,), generator=self._prompt_gen).to(dev))
            pos.append(torch.arange(e.context, e.context + e.tokens, device=dev))
        if dec:
            dslots = torch.tensor([e.slot for e in dec], device=dev)
            dctx = torch.tensor([e.context for e in dec], device=dev)
            ids.append(self.last_token[dslots])
            pos.append(dctx)
        x = self.embed[torch.cat(ids)]
        positions = torch.cat(pos)
        cos, sin = self.cos[positions], self.sin[positions]
        nq, nkv, d = g.heads, g.kv_heads, g.head_dim
        n_pre = sum(e.tokens for e in pre)
        for li, w in enumerate(self.layers):
            qkv = _rms(x, w["n1"]) @ w["wqkv"]
            q = _rope(qkv[:, : nq * d].view(-1, nq, d), cos, sin)
            k = _rope(qkv[:, nq * d: (nq + nkv) * d].view(-1, nkv, d), cos, sin)
            v = qkv[:, (nq + nkv) * d:].view(-1, nkv, d)
            kc, vc = self.k_cache[li], self.v_cache[li]
            outs, off = [], 0
            for e in pre:
                sl = slice(off, off + e.tokens)
                kc[e.slot, :, e.context: e.context + e.tokens] = k[sl].transpose(0, 1)
                vc[e.slot, :, e.context: e.context + e.tokens] = v[sl].transpose(0, 1)
                outs.append(self._prefill_attn(q[sl], kc[e.slot], vc[e.slot], e.context, e.tokens))
                off += e.tokens
            if dec:
                kc[dslots, :, dctx] = k[n_pre:]
                vc[dslots, :, dctx] = v[n_pre:]
                outs.append(self._decode_attn(q[n_pre:], kc, vc, dec, dslots, dctx))
            x = x + torch.cat(outs) @ w["wo"]
            gate, up = (_rms(x, w["n2"]) @ w["wgu"]).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ w["wdown"]
        ends, off = [], 0
        for e in pre:
            off += e.tokens
            ends.append(off - 1)
        ends += list(range(n_pre, n_pre + len(dec)))
        logits = _rms(x[torch.tensor(ends, device=dev)], self.norm) @ self.lm_head
        slots = torch.tensor([e.slot for e in pre] + [e.slot for e in dec], device=dev)
        self.last_token[slots] = logits.argmax(dim=-1)

    def _prefill_attn(self, q, kc, vc, c: int, T: int):
        """Causal attention of a chunk of T queries on c cached + T new keys (one request)."""
        g = self.g
        grp = g.heads // g.kv_heads
        qh = q.view(T, g.kv_heads, grp, g.head_dim).permute(1, 2, 0, 3).reshape(1, g.kv_heads, grp * T, g.head_dim)
        keys = torch.arange(c + T, device=self.device)
        mask = keys[None, :] <= (c + torch.arange(T, device=self.device))[:, None]
        out = F.scaled_dot_product_attention(qh, kc[None, :, : c + T], vc[None, :, : c + T],
                                             attn_mask=mask.repeat(grp, 1))
        return out.view(g.kv_heads, grp, T, g.head_dim).permute(2, 0, 1, 3).reshape(T, g.heads * g.head_dim)

    def _decode_attn(self, q, kc, vc, dec: list[Entry], dslots, dctx):
        """One query per request on its own cached keys (padded to the longest context in the batch)."""
        g = self.g
        B, grp = len(dec), g.heads // g.kv_heads
        cmax = max(e.context for e in dec) + 1
        first = dec[0].slot
        if all(e.slot == first + i for i, e in enumerate(dec)):  # contiguous slots: a view, no copy
            keys, values = kc[first: first + B, :, :cmax], vc[first: first + B, :, :cmax]
        else:
            keys, values = kc[:, :, :cmax].index_select(0, dslots), vc[:, :, :cmax].index_select(0, dslots)
        mask = (torch.arange(cmax, device=self.device)[None, :] <= dctx[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q.view(B, g.kv_heads, grp, g.head_dim), keys, values, attn_mask=mask)
        return out.reshape(B, g.heads * g.head_dim)


def _rms(x, weight, eps: float = 1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _rope(x, cos, sin):
    """Rotary embedding (half-split convention) of ``x`` (tokens, heads, d) at the tokens' positions."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
