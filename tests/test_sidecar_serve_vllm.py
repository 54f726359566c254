"""Issue 9 acceptance on the real vLLM CPU engine, through ``wattprint serve`` with its defaults: two
concurrent requests with one X-Request-Id get separate records whose tokens equal their own usage; a
record is readable through the URL its response names and not without that URL's credential; the
ledger is 0600 and the default socket's directory 0700; 2,000 garbage frames are counted and the next
request still gets a final record. Slow (starts a real engine): marked ``vllm``."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlsplit

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.vllm
WATTPRINT = [sys.executable, "-m", "wattprint.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait(pred, timeout_s: float, what: str, proc, log):
    """Poll ``pred`` until it returns something truthy; fail (with the log's tail) on timeout or exit."""
    tries = int(timeout_s / 0.3) + 1
    for _ in range(tries):
        alive = proc.poll() is None
        try:
            value = pred() if alive else None
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            value = None
        if value or not alive:
            break
        time.sleep(0.3)
    if not value:
        state = "timed out" if proc.poll() is None else f"wattprint serve exited with {proc.returncode}"
        pytest.fail(f"{state} waiting for {what}\n{log.read_text(errors='replace')[-4000:]}")
    return value


def _post(base: str, body: dict, headers: dict) -> tuple[dict, dict]:
    req = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}


def _final(url: str, proc, log) -> dict:
    def ready():
        code, body = _get(url)
        data = json.loads(body) if code == 200 else None
        return data if data and data["status"] == "final" else None

    return _wait(ready, 90, f"the final record at {url}", proc, log)


def _dropped(metrics: str) -> dict[str, float]:
    body = _get(f"{metrics}/metrics")[1].decode()
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(body) for s in f.samples
            if s.name == "wattprint_dropped_records_total"}


def test_serve_hardened(tmp_path):
    pytest.importorskip("vllm")
    from wattprint.profiler.twin.tinymodel import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny", seed=5)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    ledger = tmp_path / "ledger.jsonl"
    mport, vport = _free_port(), _free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTPRINT_")}
    env["XDG_RUNTIME_DIR"] = str(run)  # the default socket goes to $XDG_RUNTIME_DIR/wattprint
    proc = subprocess.Popen(
        WATTPRINT + ["serve", "--meter", "simulated", "--metrics-port", str(mport), "--window-s", "0.5",
                     "--ledger", str(ledger), "--", "--model", str(model), "--served-model-name", "tiny",
                     "--host", "127.0.0.1", "--port", str(vport), "--max-model-len", "2048", "--enforce-eager",
                     "--gpu-memory-utilization", "0.2"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        base, metrics = f"http://127.0.0.1:{vport}", f"http://127.0.0.1:{mport}"
        _wait(lambda: _get(f"{base}/health")[0] == 200, 400, "wattprint serve", proc, log)
        sock_dir = run / "wattprint"
        assert stat.S_IMODE(sock_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(os.stat(sock_dir / "sidecar.sock").st_mode) == 0o600
        assert stat.S_IMODE(ledger.stat().st_mode) == 0o600

        # two concurrent requests with one X-Request-Id
        out: dict[int, tuple[dict, dict]] = {}
        bodies = {0: {"model": "tiny", "prompt": "one two", "max_tokens": 5, "ignore_eos": True},
                  1: {"model": "tiny", "prompt": "a much longer prompt " * 20, "max_tokens": 11, "ignore_eos": True}}
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, _post(base, bodies[i],
                                                                                 {"X-Request-Id": "shared"})))
                   for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        urls = [out[i][1]["x-wattprint-energy-url"] for i in (0, 1)]
        assert urls[0] != urls[1]
        recs = [_final(u, proc, log) for u in urls]
        for i in (0, 1):
            usage = out[i][0]["usage"]
            assert out[i][0]["id"] == "cmpl-shared"
            assert recs[i]["prompt_tokens"] == usage["prompt_tokens"]
            assert recs[i]["output_tokens"] == usage["completion_tokens"] == bodies[i]["max_tokens"]
            assert recs[i]["energy_j"] > 0
        assert recs[0]["id"] != recs[1]["id"]
        # not readable without the URL's credential
        bare = urls[0].split("?", 1)[0]
        assert _get(bare)[0] == 401
        q0, q1 = (parse_qs(urlsplit(u).query) for u in urls)
        assert _get(f"{bare}?ref={q1['ref'][0]}&sig={q0['sig'][0]}")[0] == 403
        assert _get(f"{bare}?ref={q0['ref'][0]}&sig=AAAAAAAAAAAAAAAAAAAAAAAA")[0] == 403
        lines = [json.loads(x) for x in ledger.read_text().splitlines()]
        assert {r["id"] for r in lines} >= {recs[0]["id"], recs[1]["id"]}

        # 2,000 garbage frames, then a request that still gets its final record
        ctx = zmq.Context()
        try:
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 2000)
            push.connect(f"ipc://{sock_dir / 'sidecar.sock'}")
            for i in range(2000):
                push.send(os.urandom(1 + i % 64))
            push.close()  # term() below waits (LINGER) for the frames to go out
        finally:
            ctx.destroy(linger=0)  # on failure: closes the socket unflushed; then terminates
        _wait(lambda: _dropped(metrics).get("decode_error", 0) >= 2000, 60, "2000 decode errors", proc, log)
        body, headers = _post(base, {"model": "tiny", "prompt": "after", "max_tokens": 4, "ignore_eos": True}, {})
        rec = _final(headers["x-wattprint-energy-url"], proc, log)
        assert rec["output_tokens"] == body["usage"]["completion_tokens"] == 4
        assert _dropped(metrics)["decode_error"] == 2000
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
