"""The tiny random-weight Llama model: written on the spot, loadable by transformers, idempotent."""

from __future__ import annotations

import json

import pytest

from wattprint.errors import ConfigError
from wattprint.profiler.twin.tinymodel import MARKER, is_complete, write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=3)


def test_files_and_config(model_dir):
    assert is_complete(model_dir)
    assert (model_dir / "model.safetensors").is_file()
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    assert cfg.model_type == "llama" and cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (2, 128, 2)
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # vLLM CPU attention needs >= 64
    assert cfg.num_key_value_heads == 2 and cfg.intermediate_size == 256
    assert cfg.max_position_embeddings == 8192
    assert 1024 <= cfg.vocab_size <= 2048
    raw = json.loads((model_dir / "config.json").read_text())
    assert raw.get("dtype", raw.get("torch_dtype")) == "bfloat16"


def test_tokenizer_roundtrip_and_chat_template(model_dir):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    assert len(tok) == cfg.vocab_size
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg.bos_token_id, cfg.eos_token_id)
    for text in ["The quick brown fox jumps over the lazy dog.",
                 "Énergie: 42 J/token — ünïcödé, emoji 🙂, tabs\tand\nnewlines",
                 "  leading spaces and trailing  "]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert all(0 <= i < cfg.vocab_size for i in ids)
        assert tok.decode(ids, skip_special_tokens=True) == text
    # Trained BPE: common English words are single tokens, so text is much shorter than its bytes.
    sentence = "the energy of the prefill phase and the decode phase"
    assert len(tok(sentence)["input_ids"]) < len(sentence.encode()) / 2
    chat = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<s>") and "Hi" in chat and chat.endswith("<|assistant|>\n")


def test_weights_load_and_run(model_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([tok("hello world")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits.float()).all()


def test_idempotent_and_deterministic(model_dir, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    assert write_tiny_model(model_dir, seed=99, layers=5) == model_dir  # complete: left alone
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before
    again = write_tiny_model(tmp_path / "again", seed=3)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_incomplete_directory_is_completed(tmp_path):
    d = tmp_path / "partial"
    d.mkdir()
    (d / "config.json").write_text("{}")  # e.g. an interrupted copy: no marker, no weights
    assert not is_complete(d)
    write_tiny_model(d, seed=0, layers=1)
    assert is_complete(d) and (d / MARKER).is_file()
    assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 1


@pytest.mark.parametrize("kwargs", [dict(hidden=128, heads=3), dict(heads=2, kv_heads=3),
                                    dict(dtype="int8"), dict(vocab=100)])
def test_bad_parameters(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        write_tiny_model(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
