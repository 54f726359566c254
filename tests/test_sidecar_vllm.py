"""Full stack: vLLM's OpenAI server (tiny model) with the wattprint hook and middleware, and a sidecar
with the simulated meter. Slow (starts a real engine): marked ``vllm``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families as parse_text

from wattprint.exporters.ledger import read_ledger
from wattprint.profiler.sidecar.daemon import Sidecar

pytestmark = pytest.mark.vllm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, body=None, headers=None, timeout=60):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, dict(r.headers), r.read()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    pytest.importorskip("vllm")
    simulated = pytest.importorskip("wattprint.profiler.meters.simulated")
    from wattprint.profiler.twin.tinymodel import write_tiny_model

    tmp = tmp_path_factory.mktemp("stack")
    model = write_tiny_model(tmp / "tiny", seed=1)
    sock = os.path.join(str(tmp), "sc.sock")
    if len(sock) > 100:
        pytest.skip("tmp path too long for a unix socket")
    sidecar = Sidecar(simulated.SimulatedMeter("h100-sxm", n_devices=1, seed=0), socket_path=sock, metrics_port=0,
                      ledger_path=tmp / "ledger.jsonl", window_s=0.5).start()
    port = _free_port()
    env = dict(os.environ, WATTPRINT_SIDECAR=sock, WATTPRINT_ENERGY_URL=sidecar.metrics_url)
    log = open(tmp / "vllm.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
         "tiny", "--port", str(port), "--max-model-len", "2048", "--enforce-eager",
         "--gpu-memory-utilization", "0.2", "--middleware", "wattprint.exporters.http.WattprintMiddleware"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited early; see {tmp / 'vllm.log'}")
            try:
                _request(f"{base}/v1/models", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"vLLM did not start; see {tmp / 'vllm.log'}")
                time.sleep(1)
        yield base, sidecar, tmp
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        sidecar.stop()


def _wait_final(url, timeout_s=60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    data = None
    while time.monotonic() < deadline:
        try:
            data = json.loads(_request(url)[2])
            if data["status"] == "final":
                return data
        except urllib.error.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not final in time: {data}")


def test_chat_request_gets_its_energy(stack):
    base, sidecar, tmp = stack
    status, headers, body = _request(f"{base}/v1/chat/completions",
                                     {"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
                                      "max_tokens": 24, "ignore_eos": True},
                                     {"X-Wattprint-Stratum": "science"})
    assert status == 200
    rid = json.loads(body)["id"]
    assert headers["x-wattprint-request-id"] == rid
    url = headers["x-wattprint-energy-url"]
    assert url.startswith(f"{sidecar.metrics_url}/v1/requests/{rid}?ref=")  # a URL only this client can use
    data = _wait_final(url)
    assert data["energy_j"] > 0 and data["output_tokens"] == 24 and data["stratum"] == "science"
    assert data["source"] == "simulated" and data["model"] == "tiny" and data["prefill_j"] > 0
    text = _request(f"{sidecar.metrics_url}/metrics")[2].decode()
    samples = [s for f in parse_text(text) for s in f.samples]
    science = [s for s in samples if s.name == "wattprint_requests_total" and s.labels["stratum"] == "science"]
    assert science and science[0].value >= 1
    measured = sum(s.value for s in samples if s.name == "wattprint_device_energy_joules_total")
    parts = sum(s.value for s in samples if s.name in ("wattprint_energy_joules_total",
                                                        "wattprint_idle_energy_joules_total"))
    assert parts == pytest.approx(measured, rel=1e-9)
    assert data["id"].startswith(f"{rid}-") and data["id"] in {r["id"] for r in read_ledger(tmp / "ledger.jsonl")}


def test_streaming_completion_streams_and_is_found(stack):
    base, sidecar, _ = stack
    req = urllib.request.Request(
        f"{base}/v1/completions",
        data=json.dumps({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 16, "stream": True,
                         "ignore_eos": True}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        rid = r.headers["x-wattprint-request-id"]
        url = r.headers["x-wattprint-energy-url"]
        events = [line for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert rid.startswith("cmpl-") and len(events) > 2 and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["id"] == rid
    data = _wait_final(url)  # engine id is "<rid>-0-<8 hex>"
    assert data["output_tokens"] == 16 and data["stratum"] is None and data["id"].startswith(f"{rid}-0-")
