"""``wattprint profile`` on the real vLLM CPU engine: true token counts and conservation (issue 8).

Prompts that share a 300-word prefix (prefix caching is on by default), one 900-word prompt and short
ones, with ``--ignore-eos``: every request's prompt is the tokenizer's count (cached tokens included), its
output is ``max_tokens``, the prompts after the first sharing one report cached prompt tokens, every
request gets energy, energy is conserved in ``summary.json`` and over the request records, each record's
components add up, and ``wattprint attribute`` on the profile's files, run from another directory,
reproduces ``requests.jsonl`` byte for byte. Once with the engine's defaults, once in the degenerate
setting of small steps (``--max-num-batched-tokens 64``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from wattprint.profiler.core.records import load_steps

pytestmark = pytest.mark.vllm
WATTPRINT = [sys.executable, "-m", "wattprint.cli"]
TOLERANCE = 1e-9

_WORDS = "the energy of each step is measured and the cache keeps every token of the prompt".split()
PREFIX = " ".join(_WORDS[i % len(_WORDS)] for i in range(300))
LONG = " ".join(_WORDS[(i * 7) % len(_WORDS)] + ("s" if i % 5 == 0 else "") for i in range(900))
PROMPTS = [
    {"id": "shared-0", "prompt": PREFIX + " What is energy?", "max_tokens": 8, "stratum": "chat"},
    {"id": "shared-1", "prompt": PREFIX + " Why is the sky blue?", "max_tokens": 16, "stratum": "chat"},
    {"id": "long", "prompt": LONG, "max_tokens": 10, "stratum": "rag"},
    {"id": "shared-2", "prompt": PREFIX + " Tell me a story about the river.", "max_tokens": 5},
    {"id": "short-0", "prompt": "hello world", "max_tokens": 12},
    {"id": "short-1", "prompt": "what is energy", "max_tokens": 1},
    {"id": "short-2", "prompt": "A journey of a thousand miles", "max_tokens": 20, "stratum": "chat"},
]
SHARING_AFTER_FIRST = {"shared-1", "shared-2"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("vllm")
    from wattprint.profiler.twin.tinymodel import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", seed=5)


@pytest.fixture(scope="module")
def prompt_tokens(model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    return {p["id"]: len(tok(p["prompt"])["input_ids"]) for p in PROMPTS}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("engine_args", [
    pytest.param([], id="defaults"),
    pytest.param(["--max-num-batched-tokens", "64", "--enforce-eager", "--max-model-len", "2048"], id="small-steps"),
])
def test_profile_counts_tokens_and_conserves_energy(model, prompt_tokens, tmp_path, engine_args):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "out"
    proc = subprocess.run(
        WATTPRINT + ["profile", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
                     "--meter", "simulated", "--ignore-eos", *engine_args],
        capture_output=True, text=True, timeout=800, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    reqs = {r["id"]: r for r in _jsonl(out / "requests.jsonl")}
    assert set(reqs) == {p["id"] for p in PROMPTS}
    assert prompt_tokens["long"] > 1000 and prompt_tokens["shared-0"] > 300
    for p in PROMPTS:
        r = reqs[p["id"]]
        assert r["prompt_tokens"] == prompt_tokens[p["id"]], p["id"]  # cached tokens included
        assert r["output_tokens"] == p["max_tokens"], p["id"]  # --ignore-eos
        assert r["energy_j"] > 0, p["id"]
        assert r["compute_j"] + r["weights_j"] + r["kv_j"] + r["static_j"] == pytest.approx(r["energy_j"], rel=TOLERANCE)
        assert min(r["compute_j"], r["weights_j"], r["kv_j"], r["static_j"]) >= 0
        assert r["prefill_j"] + r["decode_j"] == pytest.approx(r["energy_j"], rel=TOLERANCE)
        if p["id"] in SHARING_AFTER_FIRST:
            assert 0 < r["cached_prompt_tokens"] < r["prompt_tokens"], p["id"]
        elif not p["id"].startswith("shared"):
            assert r["cached_prompt_tokens"] == 0, p["id"]

    # what the hook recorded: the prefix-cache hit as the first entry's context, the engine's output count
    entries: dict[str, list[dict]] = {}
    for step in load_steps(out / "steps.jsonl").steps:  # the requests as columns (what wattprint writes)
        for e in step.requests:
            entries.setdefault(e.id, []).append(msgspec.structs.asdict(e))
    for p in PROMPTS:
        es = entries[p["id"]]
        assert es[0].get("context_tokens", 0) == reqs[p["id"]]["cached_prompt_tokens"]
        assert es[0].get("context_tokens", 0) + sum(e.get("prefill_tokens", 0) for e in es) == prompt_tokens[p["id"]]
        assert [e.get("finished", False) for e in es] == [False] * (len(es) - 1) + [True]
        assert es[-1]["output_tokens"] == p["max_tokens"]

    s = json.loads((out / "summary.json").read_text())
    budget = s["measured_j"] + s["extrapolated_j"]
    assert s["measured_j"] > 0
    assert abs(s["attributed_j"] + s["idle_j"] - budget) <= TOLERANCE * s["measured_j"]
    assert s["conservation_error"] <= TOLERANCE
    assert abs(sum(r["energy_j"] for r in reqs.values()) + s["idle_j"] - budget) <= TOLERANCE * s["measured_j"]

    # replay from another working directory, with what the summary names
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = elsewhere / "again.jsonl"
    rc = subprocess.run(WATTPRINT + ["attribute", "--steps", str(out / "steps.jsonl"), "--energy",
                                     str(out / "energy.jsonl"), "--model", s["model_config"], "--hardware",
                                     s["hardware"], "--out", str(again), "-q"],
                        cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stdout[-2000:] + rc.stderr[-3000:]
    assert again.read_text() == (out / "requests.jsonl").read_text()
