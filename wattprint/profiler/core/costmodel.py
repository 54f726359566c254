"""The v1 analytic cost model: pure functions over a dense decoder's geometry.

This is the public convention that splits a step's shared costs between the requests in it; it is
documented in ``docs/attribution.md`` and implemented here exactly. Every function works on Python
numbers and, elementwise, on numpy arrays.

Symbols: L layers, h hidden size, n_q query heads, n_kv kv heads, d head dim, I intermediate
size, V vocabulary, b bytes per weight/KV element.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from wattprint.errors import ConfigError

#: Hugging Face ``model_type`` values of dense decoders the v1 model describes exactly.
DENSE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "bf16": 2, "fp16": 2, "float32": 4, "float": 4, "fp32": 4}


@dataclass(frozen=True)
class ModelGeometry:
    """The shape of a dense decoder, as far as energy is concerned."""

    name: str
    layers: int  # L
    hidden: int  # h
    heads: int  # n_q
    kv_heads: int  # n_kv
    head_dim: int  # d
    intermediate: int  # I
    vocab: int  # V
    dtype_bytes: int  # b

    @property
    def decoder_params(self) -> int:
        """N = L·(h·n_q·d + 2·h·n_kv·d + n_q·d·h + 3·h·I)."""
        L, h, nq, nkv, d, I = self.layers, self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate
        return L * (h * nq * d + 2 * h * nkv * d + nq * d * h + 3 * h * I)

    @property
    def head_params(self) -> int:
        """H = V·h (the LM head)."""
        return self.vocab * self.hidden

    @property
    def weight_bytes(self) -> int:
        """W = (N + H)·b: weight bytes read once per step."""
        return (self.decoder_params + self.head_params) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """k = 2·L·n_kv·d·b: K and V bytes one token occupies across all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def request_flops(g: ModelGeometry, new_tokens, context_tokens):
    """F = 2·N·T + 2·H + 4·L·n_q·d·T·(c + (T+1)/2) for T new tokens on c cached tokens."""
    T, c = new_tokens, context_tokens
    return (
        2.0 * g.decoder_params * T
        + 2.0 * g.head_params
        + 4.0 * g.layers * g.heads * g.head_dim * T * (c + (T + 1) / 2.0)
    )


def kv_read_bytes(g: ModelGeometry, context_tokens):
    """KV read = k·c: the cached K and V the request's attention reads."""
    return g.kv_bytes_per_token * context_tokens


def kv_write_bytes(g: ModelGeometry, new_tokens):
    """KV write = k·T: the K and V the step appends for the request's new tokens."""
    return g.kv_bytes_per_token * new_tokens


def dynamic_energy_j(g: ModelGeometry, new_tokens, context_tokens, step_new_tokens, energy_per_flop_j, energy_per_byte_j):
    """d_r = e_flop·F + e_byte·(KV read + KV write) + e_byte·W·T/T_step (joules)."""
    flops = request_flops(g, new_tokens, context_tokens)
    kv = kv_read_bytes(g, context_tokens) + kv_write_bytes(g, new_tokens)
    return energy_per_flop_j * flops + energy_per_byte_j * kv + energy_per_byte_j * g.weight_bytes * new_tokens / step_new_tokens


def geometry_from_config(config: dict | str | Path, name: str | None = None) -> ModelGeometry:
    """Read a Hugging Face ``config.json`` (dict or path) of a Llama/Mistral/Qwen2/Qwen3-style model.

    MoE and unknown architectures are refused with a :class:`ConfigError`.
    """
    origin = "<config>"
    if not isinstance(config, dict):
        origin = str(config)
        p = Path(config)
        if p.is_dir():
            p = p / "config.json"
            origin = str(p)
        try:
            config = json.loads(p.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read model config: {exc.strerror or exc}", origin) from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config is not valid JSON: {exc.msg}", origin, exc.lineno) from exc
        if name is None:
            name = (p.parent.name if p.name == "config.json" else p.stem) or p.stem
    if not isinstance(config, dict):
        raise ConfigError("model config must be a JSON object", origin)
    if isinstance(config.get("text_config"), dict) and "model_type" not in config:
        config = config["text_config"]
    model_type = str(config.get("model_type", "")).lower()
    archs = config.get("architectures") or []
    moe = [k for k in _MOE_KEYS if config.get(k)]
    if moe or "moe" in model_type or model_type in {"mixtral", "deepseek_v2", "deepseek_v3"}:
        raise ConfigError(
            f"model_type {model_type!r} is a mixture of experts ({', '.join(moe) or model_type}); "
            "the v1 cost model covers dense decoders only",
            origin,
        )
    if model_type not in DENSE_MODEL_TYPES:
        raise ConfigError(
            f"unsupported model_type {model_type!r} (architectures {archs}); "
            f"the v1 cost model knows {', '.join(sorted(DENSE_MODEL_TYPES))}",
            origin,
        )

    def need_int(key: str, default=None) -> int:
        v = config.get(key, default)
        if v is None:
            raise ConfigError(f"model config lacks {key!r}", origin)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"model config key {key!r} must be a positive integer, got {v!r}", origin)
        return v

    L = need_int("num_hidden_layers")
    h = need_int("hidden_size")
    nq = need_int("num_attention_heads")
    nkv = need_int("num_key_value_heads", nq)
    d = need_int("head_dim", h // nq if h % nq == 0 else None)
    inter = need_int("intermediate_size")
    vocab = need_int("vocab_size")
    dtype = config.get("torch_dtype", config.get("dtype", "bfloat16")) or "bfloat16"
    b = _DTYPE_BYTES.get(str(dtype).lower().replace("torch.", ""))
    if b is None:
        raise ConfigError(f"unsupported dtype {dtype!r}; known: {', '.join(sorted(_DTYPE_BYTES))}", origin)
    if nq % nkv:
        raise ConfigError(f"num_attention_heads {nq} is not a multiple of num_key_value_heads {nkv}", origin)
    return ModelGeometry(
        name=name or str(config.get("_name_or_path") or model_type),
        layers=L, hidden=h, heads=nq, kv_heads=nkv, head_dim=d, intermediate=inter, vocab=vocab, dtype_bytes=b,
    )
