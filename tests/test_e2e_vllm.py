"""End to end on the real vLLM CPU engine with the tiny model, through wattprint's own commands.

* ``wattprint sidecar`` and vLLM's OpenAI server as separate processes: requests through the ``openai``
  client get final records whose tokens match what vLLM returned; a long prompt is chunked; the
  metrics conserve energy in one scrape and pass ``promtool check metrics``; the sidecar killed
  mid-run leaves vLLM serving, and a restarted sidecar picks records up again.
* ``wattprint serve`` starts both in one command and stops both on SIGTERM.
* ``wattprint profile`` writes its files, and ``wattprint attribute`` reproduces its requests.jsonl.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wattprint.profiler.core.records import load_steps

pytestmark = pytest.mark.vllm
WATTPRINT = [sys.executable, "-m", "wattprint.cli"]
MAX_BATCHED = 128  # small step budget: a long prompt is prefilled in several chunks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OPERATOR_TOKEN = "e2e-operator-token-0123456789"  # the sidecars below read everything with it


def _get(url: str, timeout: float = 5.0, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait(pred, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            pytest.fail(f"process exited with {proc.returncode} while waiting for {what}\n{tail}")
        try:
            value = pred()
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            value = None
        if value:
            return value
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-4000:] if log else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 60) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("vllm")
    from wattprint.profiler.twin.tinymodel import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", seed=3)


def _start_sidecar(tmp: Path, sock: str, port: int, name: str) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen(
        WATTPRINT + ["sidecar", "--meter", "simulated", "--socket", sock, "--metrics-port", str(port),
                     "--ledger", str(tmp / "ledger.jsonl"), "--window-s", "0.5"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, WATTPRINT_OPERATOR_TOKEN=OPERATOR_TOKEN))


def _final(metrics: str, rid: str, timeout_s: float = 80.0) -> dict:
    def ready():
        code, body = _get(f"{metrics}/v1/requests/{rid}", token=OPERATOR_TOKEN)
        data = json.loads(body) if code == 200 else None
        return data if data and data.get("status") == "final" else None

    return _wait(ready, timeout_s, f"the final record of {rid}")


def _scrape(metrics: str) -> dict[str, float]:
    """Sum of samples per metric name (over labels) in one scrape."""
    _, body = _get(f"{metrics}/metrics")
    sums: dict[str, float] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            sums[s.name] = sums.get(s.name, 0.0) + s.value
    return sums


@pytest.fixture(scope="module")
def stack(model, tmp_path_factory):
    """A `wattprint sidecar` process and vLLM's OpenAI server process, wired by the socket."""
    tmp = tmp_path_factory.mktemp("e2e")
    sock = str(tmp / "sc.sock")
    mport, vport = _free_port(), _free_port()
    sidecar = _start_sidecar(tmp, sock, mport, "sidecar")
    metrics = f"http://127.0.0.1:{mport}"
    _wait(lambda: _get(f"{metrics}/healthz")[0] in (200, 503), 60, "the sidecar", sidecar, tmp / "sidecar.log")
    env = dict(os.environ, WATTPRINT_SIDECAR=sock, WATTPRINT_ENERGY_URL=metrics)
    vlog = tmp / "vllm.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
         "tiny", "--host", "127.0.0.1", "--port", str(vport), "--max-model-len", "2048", "--enforce-eager",
         "--gpu-memory-utilization", "0.2", "--max-num-batched-tokens", str(MAX_BATCHED),
         "--middleware", "wattprint.exporters.http.WattprintMiddleware"],
        env=env, stdout=open(vlog, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{vport}"
    _wait(lambda: _get(f"{base}/health")[0] == 200, 400, "the vLLM server", server, vlog)
    state = {"sidecar": sidecar}
    try:
        yield base, metrics, tmp, sock, mport, state
    finally:
        _stop(server)
        _stop(state["sidecar"], signal.SIGINT)


def _client(base: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)


def test_requests_get_final_records_matching_vllm(stack):
    base, metrics, tmp, *_ = stack
    client = _client(base)
    long_prompt = " ".join(["energy"] * 400)  # > MAX_BATCHED tokens: chunked prefill
    cases = [("hello there", 8, "science"), (long_prompt, 16, "critical"), ("tell me a story", 24, None)]
    for prompt, max_tokens, stratum in cases:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                      extra_body={"vllm_xargs": {"stratum": stratum}} if stratum else None)
        rec = _final(metrics, r.id)
        assert rec["output_tokens"] == r.usage.completion_tokens
        assert rec["prompt_tokens"] == r.usage.prompt_tokens
        assert rec["stratum"] == stratum
        assert rec["source"] == "simulated"
        assert rec["energy_j"] > 0 and rec["prefill_j"] + rec["decode_j"] == pytest.approx(rec["energy_j"], rel=1e-9)
        assert rec["kv_write_bytes"] > 0
    # the long prompt was prefilled in several steps: its prefill KV writes cover the whole prompt
    ledger = [json.loads(x) for x in (tmp / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) >= 3


def test_metrics_conserve_and_pass_promtool(stack):
    base, metrics, *_ = stack
    _client(base).completions.create(model="tiny", prompt="one more", max_tokens=4)
    time.sleep(1.5)
    m = _scrape(metrics)
    measured = m["wattprint_device_energy_joules_total"]
    attributed = m["wattprint_energy_joules_total"]
    idle = m["wattprint_idle_energy_joules_total"]
    assert measured > 0 and attributed > 0
    assert attributed + idle == pytest.approx(measured, rel=1e-9)
    assert m["wattprint_steps_total"] > 0
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    _, body = _get(f"{metrics}/metrics")
    proc = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert not proc.stdout.strip() and not proc.stderr.strip(), "promtool reported problems"


def test_sidecar_killed_then_restarted(stack):
    base, metrics, tmp, sock, mport, state = stack
    client = _client(base)
    _stop(state["sidecar"], signal.SIGKILL)  # killed mid-run
    r = client.completions.create(model="tiny", prompt="still serving?", max_tokens=8)
    assert r.usage.completion_tokens == 8 or r.choices[0].finish_reason in ("stop", "length")
    state["sidecar"] = _start_sidecar(tmp, sock, mport, "sidecar-restarted")
    _wait(lambda: _get(f"{metrics}/healthz")[0] in (200, 503), 60, "the restarted sidecar", state["sidecar"],
          tmp / "sidecar-restarted.log")
    time.sleep(1.0)  # the hook reconnects by itself
    r = client.completions.create(model="tiny", prompt="after the restart", max_tokens=12)
    rec = _final(metrics, r.id)
    assert rec["output_tokens"] == r.usage.completion_tokens and rec["energy_j"] > 0


def test_serve_runs_both_and_stops_on_sigterm(model, tmp_path):
    mport, vport = _free_port(), _free_port()
    sock = str(tmp_path / "serve.sock")
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        WATTPRINT + ["serve", "--meter", "simulated", "--socket", sock, "--metrics-port", str(mport), "--window-s",
                     "0.5", "--", "--model", str(model), "--served-model-name", "tiny", "--host", "127.0.0.1",
                     "--port", str(vport), "--max-model-len", "2048", "--enforce-eager",
                     "--gpu-memory-utilization", "0.2"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{vport}"
        _wait(lambda: _get(f"{base}/health")[0] == 200, 400, "wattprint serve", proc, log)
        r = _client(base).completions.with_raw_response.create(model="tiny", prompt="hi", max_tokens=6)
        energy_url = r.headers.get("x-wattprint-energy-url")
        assert energy_url and energy_url.startswith(f"http://127.0.0.1:{mport}/v1/requests/")
        rec = _wait(lambda: (lambda c_b: json.loads(c_b[1]) if c_b[0] == 200 and json.loads(c_b[1])["status"] == "final"
                             else None)(_get(energy_url)), 40, "the energy record", proc, log)
        assert rec["output_tokens"] == r.parse().usage.completion_tokens
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(90) == 0
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{base}/health", timeout=2)
    finally:
        _stop(proc, signal.SIGKILL)


def test_profile_is_reproduced_by_attribute(model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": "short", "prompt": "hello world", "max_tokens": 5, "stratum": "science"},
            {"id": "long", "prompt": " ".join(["cache"] * 300), "max_tokens": 12, "stratum": "agentic"},
            {"id": "plain", "prompt": "what is energy", "max_tokens": 20, "stratum": None}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    proc = subprocess.run(
        WATTPRINT + ["profile", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--meter",
                     "simulated", "--ignore-eos", "--max-num-batched-tokens", str(MAX_BATCHED), "--enforce-eager",
                     "--max-model-len", "2048"], capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("requests.jsonl", "steps.jsonl", "energy.jsonl", "summary.json", "metrics.prom"):
        assert (out / name).exists(), name
    reqs = {r["id"]: r for r in map(json.loads, (out / "requests.jsonl").read_text().splitlines())}
    assert set(reqs) == {"short", "long", "plain"}
    assert [reqs[r["id"]]["output_tokens"] for r in rows] == [5, 12, 20]  # --ignore-eos: exactly max_tokens
    steps = load_steps(out / "steps.jsonl").steps  # the requests as columns (what wattprint writes)
    long_chunks = [e for s in steps for e in s.requests if e.id == "long" and e.prefill_tokens > 0]
    assert len(long_chunks) >= 2 and sum(e.prefill_tokens for e in long_chunks) == reqs["long"]["prompt_tokens"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attributed_j"] + summary["idle_j"] == pytest.approx(summary["measured_j"], rel=1e-9)
    assert summary["hardware"] and summary["model_config"].endswith("config.json")
    again = tmp_path / "again.jsonl"
    rc = subprocess.run(WATTPRINT + ["attribute", "--steps", str(out / "steps.jsonl"), "--energy",
                                     str(out / "energy.jsonl"), "--model", summary["model_config"], "--hardware",
                                     summary["hardware"], "--out", str(again), "-q"], timeout=120).returncode
    assert rc == 0
    assert again.read_text() == (out / "requests.jsonl").read_text()
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=(out / "metrics.prom").read_bytes(),
                               capture_output=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
