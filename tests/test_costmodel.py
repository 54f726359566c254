import json

import numpy as np
import pytest

from wattprint.errors import ConfigError
from wattprint.profiler.core import costmodel as cm

SMALL = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2,
         "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 10, "torch_dtype": "float32"}


def test_geometry_and_formulas_by_hand():
    g = cm.geometry_from_config(SMALL)
    assert (g.layers, g.hidden, g.heads, g.kv_heads, g.head_dim, g.intermediate, g.vocab, g.dtype_bytes) == (
        2, 8, 2, 1, 4, 16, 10, 4)
    # N = L·(h·n_q·d + 2·h·n_kv·d + n_q·d·h + 3·h·I) = 2·(64 + 64 + 64 + 384)
    assert g.decoder_params == 2 * (8 * 2 * 4 + 2 * 8 * 1 * 4 + 2 * 4 * 8 + 3 * 8 * 16) == 1152
    assert g.head_params == 80
    assert g.weight_bytes == (1152 + 80) * 4
    assert g.kv_bytes_per_token == 2 * 2 * 1 * 4 * 4
    # F = 2·N·T + 2·H + 4·L·n_q·d·T·(c + (T+1)/2) with T=3, c=5
    assert cm.request_flops(g, 3, 5) == 2 * 1152 * 3 + 2 * 80 + 4 * 2 * 2 * 4 * 3 * (5 + 2)
    assert cm.kv_read_bytes(g, 5) == 64 * 5
    assert cm.kv_write_bytes(g, 3) == 64 * 3
    d = cm.dynamic_energy_j(g, 3, 5, 10, 2e-12, 1e-10)
    expect = 2e-12 * cm.request_flops(g, 3, 5) + 1e-10 * 64 * 8 + 1e-10 * g.weight_bytes * 3 / 10
    assert d == pytest.approx(expect, rel=1e-15)
    # vectorised
    f = cm.request_flops(g, np.array([3, 1]), np.array([5, 0]))
    assert f[0] == cm.request_flops(g, 3, 5) and f[1] == cm.request_flops(g, 1, 0)


def test_llama_8b_kv_per_token_matches_published(llama8b):
    assert llama8b.kv_bytes_per_token == 128 * 1024  # facts.md: 128 KiB per token, bf16
    assert 6.9e9 < llama8b.decoder_params < 7.1e9


@pytest.mark.parametrize("extra", [{"num_local_experts": 8}, {"model_type": "mixtral"}, {"model_type": "qwen2_moe"}])
def test_moe_refused(extra):
    with pytest.raises(ConfigError, match="mixture of experts"):
        cm.geometry_from_config({**SMALL, **extra})


def test_unknown_architecture_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        cm.geometry_from_config({**SMALL, "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="hidden_size"):
        cm.geometry_from_config({k: v for k, v in SMALL.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="dtype"):
        cm.geometry_from_config({**SMALL, "torch_dtype": "int4"})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=str(bad)):
        cm.geometry_from_config(bad)
    good = tmp_path / "m" / "config.json"
    good.parent.mkdir()
    good.write_text(json.dumps(SMALL))
    assert cm.geometry_from_config(good.parent).name == "m"
