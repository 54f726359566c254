"""The sidecar with the real OnlineAttributor, EnergyTimeline and simulated meter, over ZeroMQ and HTTP."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families as parse_text

from wattprint.exporters.ledger import read_ledger
from wattprint.profiler.core.records import RequestEntry, StepRecord
from wattprint.profiler.sidecar.daemon import Sidecar
from wattprint.profiler.transport import messages as transport

pytest.importorskip("wattprint.profiler.attribution.online")
pytest.importorskip("wattprint.profiler.timeline.sampler")
simulated = pytest.importorskip("wattprint.profiler.meters.simulated")

LLAMA = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
         "num_key_value_heads": 2, "intermediate_size": 1024, "vocab_size": 32000, "torch_dtype": "bfloat16"}


OPERATOR = "integration-operator-token"


def _get(url):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {OPERATOR}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read().decode()


def test_real_attributor_end_to_end(tmp_path):
    sock = os.path.join(str(tmp_path), "wp.sock")
    if len(sock) > 100:
        pytest.skip("tmp path too long for a unix socket")
    ledger = tmp_path / "ledger.jsonl"
    meter = simulated.SimulatedMeter("h100-sxm", n_devices=1, seed=1)
    sc = Sidecar(meter, socket_path=sock, metrics_port=0, ledger_path=ledger, window_s=0.3,
                 advance_interval_s=0.05, operator_token=OPERATOR)
    with sc:
        ctx = zmq.Context()
        try:
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(sc.address)
            push.send(transport.encode(transport.Hello(pid=os.getpid(), model="tiny", model_config=LLAMA)))
            step = 0
            t_end = time.monotonic() + 1.2
            while time.monotonic() < t_end:  # two requests decode side by side for ~1 s
                t0 = time.monotonic()
                time.sleep(0.02)
                t1 = time.monotonic()
                first = step == 0
                last = time.monotonic() + 0.02 >= t_end
                reqs = [RequestEntry(rid, 64 if first else 0, 0 if first else 1, 0 if first else 64 + step,
                                     stratum=s, prompt_tokens=64, finished=last)
                        for rid, s in (("chatcmpl-a-0a0a0a0a", "science"), ("chatcmpl-b-0b0b0b0b", "whatever"))]
                push.send(transport.encode(transport.Steps(pid=os.getpid(), records=[
                    StepRecord(step=step, t_start=t0, t_end=t1, requests=reqs)])))
                step += 1
            deadline = time.monotonic() + 30  # finals come ~30 windows after a request (the fit's lead)
            data = None
            while time.monotonic() < deadline:
                try:
                    data = json.loads(_get(f"{sc.metrics_url}/v1/requests/chatcmpl-a"))
                except urllib.error.HTTPError:
                    data = None
                if data and data["status"] == "final":
                    break
                time.sleep(0.1)
            assert data and data["status"] == "final", (data, sc.snapshot().dropped, sc.snapshot().lag_s, sc.health())
            assert data["energy_j"] > 0 and data["source"] == "simulated" and data["model"] == "tiny"

            fams = list(parse_text(_get(f"{sc.metrics_url}/metrics")))
            samples = [s for f in fams for s in f.samples]
            measured = sum(s.value for s in samples if s.name == "wattprint_device_energy_joules_total")
            attributed = sum(s.value for s in samples if s.name == "wattprint_energy_joules_total")
            idle = sum(s.value for s in samples if s.name == "wattprint_idle_energy_joules_total")
            assert measured > 0 and attributed > 0
            assert attributed + idle == pytest.approx(measured, rel=1e-9)
            strata = {s.labels["stratum"] for s in samples if s.name == "wattprint_energy_joules_total"}
            assert strata <= {"science", "unclassified"}
            coeffs = [s for s in samples if s.name == "wattprint_model_coefficient"]
            assert coeffs
        finally:
            ctx.destroy(linger=0)  # closes the socket (unsent messages dropped), then terminates
    rows = read_ledger(ledger)
    assert sorted(r["id"] for r in rows) == ["chatcmpl-a-0a0a0a0a", "chatcmpl-b-0b0b0b0b"]
    assert all(r["source"] == "simulated" for r in rows)
