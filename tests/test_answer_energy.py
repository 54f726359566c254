"""Energy in the answer and the policy in the middleware, without an engine: the pure helpers
(:mod:`wattprint.exporters.answer`), the sidecar lookup against a real local HTTP server (up, down,
hung), the policy gate and its metric families."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from wattprint.exporters import answer
from wattprint.exporters.energy_client import EnergyLookup
from wattprint.exporters.policy_gate import PolicyGate
from wattprint.exporters.policy_metrics import PolicyCollector, parse_stats
from wattprint.profiler.policy.config import parse_policy

RECORD = {"id": "cmpl-1", "energy_j": 3.0, "prefill_j": 1.0, "decode_j": 2.0, "kv_j": 0.25, "status": "provisional",
          "source": "simulated", "efficiency_class": "C", "output_tokens": 7}


# ------------------------------------------------------------------------------------------ answer
def test_energy_fields_headers_and_body():
    e = answer.energy_of(RECORD, "http://x/v1/requests/cmpl-1?ref=r&sig=s")
    assert e == {"energy_j": 3.0, "prefill_j": 1.0, "decode_j": 2.0, "kv_j": 0.25, "status": "provisional",
                 "source": "simulated", "efficiency_class": "C", "url": "http://x/v1/requests/cmpl-1?ref=r&sig=s"}
    h = dict(answer.energy_headers(e))
    assert h[b"x-wattprint-energy-j"] == b"3.0" and h[b"x-wattprint-prefill-j"] == b"1.0"
    assert h[b"x-wattprint-energy-status"] == b"provisional" and h[b"x-wattprint-class"] == b"C"
    assert float(h[b"x-wattprint-prefill-j"]) + float(h[b"x-wattprint-decode-j"]) == float(h[b"x-wattprint-energy-j"])
    body = answer.with_usage_energy(b'{"id": "cmpl-1", "usage": {"completion_tokens": 7}}', e)
    assert json.loads(body)["usage"] == {"completion_tokens": 7, "energy": e}
    assert answer.with_usage_energy(b"not json", e) is None and answer.with_usage_energy(b"[1]", e) is None
    assert answer.completion_tokens(b'{"usage": {"completion_tokens": 7}}') == 7


@pytest.mark.parametrize("record", [None, {}, {**RECORD, "energy_j": float("nan")}, {**RECORD, "kv_j": -1.0},
                                    {**RECORD, "decode_j": "2"}, [1, 2], {**RECORD, "energy_j": True}])
def test_unusable_records_are_unavailable(record):
    e = answer.energy_of(record, None)
    assert e["status"] == "unavailable" and e["energy_j"] is None
    assert dict(answer.energy_headers(e)) == {b"x-wattprint-energy-status": b"unavailable"}


def test_hostile_labels_are_dropped():
    e = answer.energy_of({**RECORD, "source": "a\r\nSet-Cookie: x", "efficiency_class": "x" * 1000}, None)
    assert e["source"] is None and e["efficiency_class"] is None and e["energy_j"] == 3.0


def test_sse_events_survive_any_message_boundaries():
    stream = (b'data: {"choices": [{"text": "a"}], "usage": null}\n\n'
              b'data: {"choices": [], "usage": {"completion_tokens": 2}}\n\n' b"data: [DONE]\n\n")
    for cut in range(1, len(stream)):
        ev = answer.SSEEvents()
        events = ev.feed(stream[:cut]) + ev.feed(stream[cut:])
        assert b"".join(events) == stream and ev.rest() == b""
        assert [answer.usage_event(x) for x in events] == [False, True, False]
        assert [answer.is_done(x) for x in events] == [False, False, True]
    e = answer.energy_of(RECORD, None)
    usage = answer.event_with_energy(events[1], e)
    assert json.loads(answer.event_data(usage))["usage"]["energy"] == e
    assert answer.energy_comment(e).startswith(b": energy {") and answer.energy_comment(e).endswith(b"\n\n")


def test_sse_gives_up_on_oversized_partial_events():
    ev = answer.SSEEvents(max_event_bytes=100)
    out = ev.feed(b"data: " + b"x" * 200)
    assert out == [b"data: " + b"x" * 200] and ev.gave_up
    assert ev.feed(b"more\n\n") == [b"more\n\n"]


# ----------------------------------------------------------------------------------------- lookup
class _Sidecar(BaseHTTPRequestHandler):
    records: dict = {}
    delay_s = 0.0

    def do_GET(self):  # noqa: N802 - stdlib name
        time.sleep(self.delay_s)
        path = self.path.split("?")[0]
        rec = self.records.get(path.rsplit("/", 1)[-1])
        body = json.dumps(rec if rec is not None else {"error": "unknown"}).encode()
        self.send_response(200 if rec is not None else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def sidecar():
    handler = type("H", (_Sidecar,), {"records": {"cmpl-1": RECORD}, "delay_s": 0.0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, handler
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lookup_up_missing_down_and_hung(sidecar):
    server, handler = sidecar
    lk = EnergyLookup(f"http://127.0.0.1:{server.server_port}", timeout_s=0.2)
    assert asyncio.run(lk.record("cmpl-1", "a", "b")) == RECORD
    assert asyncio.run(lk.record("nope", "a", "b")) is None
    # waiting for the last tokens: gives up at wait_s with the best record seen
    lk.wait_s = 0.05
    t0 = time.monotonic()
    assert asyncio.run(lk.record("cmpl-1", "a", "b", output_tokens=99)) == RECORD
    assert 0.04 < time.monotonic() - t0 < 0.5
    # hung: bounded by the timeout, then the breaker stops asking
    handler.delay_s = 1.0
    lk = EnergyLookup(f"http://127.0.0.1:{server.server_port}", timeout_s=0.05, trip_after=2, cooldown_s=60)

    async def three():
        return [await lk.record("cmpl-1", "a", "b") for _ in range(3)]

    t0 = time.monotonic()
    assert asyncio.run(three()) == [None, None, None]
    assert time.monotonic() - t0 < 0.5 and lk.counts["failed"] == 2 and lk.counts["skipped"] == 1
    down = EnergyLookup(f"http://127.0.0.1:{_free_port()}", timeout_s=0.2)
    assert asyncio.run(down.record("cmpl-1", "a", "b")) is None and down.counts["failed"] == 1


# ------------------------------------------------------------------------------------ policy gate
POLICY = """
api_keys: {sk-lab: [science], sk-ops: [critical, agentic]}
claimable: [agentic]
strata:
  agentic: {priority: 3, budget_j: 10, budget_window_s: 60, on_breach: reject}
  science: {priority: 1, budget_j: 10, budget_window_s: 60, on_breach: observe}
  critical: {priority: 0}
"""


def test_gate_assigns_decides_counts_and_rejects(tmp_path):
    now = [100.0]
    gate = PolicyGate(parse_policy(POLICY), priority=True, stats_dir=str(tmp_path), clock=lambda: now[0])
    v = gate.admit(b"Bearer sk-lab", b"critical")  # a key claiming beyond its strata
    assert v.stratum == "science" and v.assignment.refused == "not_allowed" and v.decision.decision == "admit"
    data = {"vllm_xargs": {"stratum": "critical", "k": 1}, "priority": -100}
    gate.rewrite(data, v)
    assert data == {"vllm_xargs": {"stratum": "science", "k": 1}, "priority": 1}
    gate.charge("agentic", {"energy_j": 12.0, "status": "provisional"})
    v = gate.admit(None, b"agentic")
    assert v.decision.decision == "reject" and gate.admit(b"Bearer sk-ops", None).decision.decision == "admit"
    start, body = gate.rejection(v)
    h = dict(start["headers"])
    assert start["status"] == 429 and 1 <= int(h[b"retry-after"]) <= 61 and h[b"x-wattprint-policy"] == b"rejected"
    assert json.loads(body["body"])["error"]["code"] == 429
    gate.charge("science", {"energy_j": 50.0, "status": "final"})
    v = gate.admit(b"Bearer sk-lab", None)
    assert v.decision.decision == "observe" and (b"x-wattprint-policy", b"breach") in v.headers()
    gate.charge("science", {"energy_j": None, "status": "unavailable"})
    gate.write_stats()
    (name,) = os.listdir(tmp_path)
    assert os.stat(tmp_path / name).st_mode & 0o777 == 0o600
    stats = parse_stats((tmp_path / name).read_bytes())
    assert stats["decisions"]["agentic"]["reject"] == 1 and stats["decisions"]["science"]["observe"] == 1
    assert stats["refused_claims"]["not_allowed"] == 1 and stats["remaining_j"]["agentic"] == 0.0
    gate.close()


def test_gate_without_priority_scheduling_leaves_priority_alone():
    gate = PolicyGate(parse_policy(POLICY))
    data = {"priority": 5}
    gate.rewrite(data, gate.admit(None, None))
    assert data == {"priority": 5, "vllm_xargs": {"stratum": "unclassified"}}


def test_collector_sums_processes_and_skips_bad_files(tmp_path):
    gate = PolicyGate(parse_policy(POLICY), stats_dir=str(tmp_path))
    for _ in range(3):
        gate.admit(None, b"agentic")
    gate.write_stats()
    other = {"decisions": {"agentic": {"admit": 2, "reject": 5}}, "refused_claims": {"unknown": 4},
             "remaining_j": {"agentic": 1.5}, "budget_j": {"agentic": 10.0}}
    (tmp_path / "policy-2-x.json").write_text(json.dumps(other))
    for bad in ({"decisions": {"martian": {"admit": 1}}}, {"decisions": {"agentic": {"admit": -1}}},
                {"remaining_j": {"agentic": float("inf")}}, [1]):
        (tmp_path / f"policy-bad-{len(os.listdir(tmp_path))}.json").write_text(json.dumps(bad))
    (tmp_path / "policy-huge.json").write_bytes(b" " * (100 << 10))
    registry = CollectorRegistry()
    collector = PolicyCollector(str(tmp_path))
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert 'wattprint_policy_decisions_total{decision="admit",stratum="agentic"} 5.0' in text
    assert 'wattprint_policy_decisions_total{decision="reject",stratum="agentic"} 5.0' in text
    assert 'wattprint_policy_budget_remaining_joules{stratum="agentic"} 1.5' in text
    assert 'wattprint_policy_stratum_claims_refused_total{reason="unknown"} 4.0' in text
    assert "wattprint_policy_stats_files_rejected_total 5.0" in text
    generate_latest(registry)  # a second scrape does not count the same bad files again
    assert collector.rejected == 5
    empty = CollectorRegistry()
    empty.register(PolicyCollector(None))
    assert "# TYPE wattprint_policy_decisions_total counter" in generate_latest(empty).decode()
    gate.close()


# ------------------------------------------------------------------------------------- energy_send
def _drive(messages, *, record=RECORD, seen=None):
    from wattprint.exporters.answer_send import energy_send

    sent, charged, asked = [], [], []

    async def send(m):
        sent.append(m)

    async def fetch(tokens):
        asked.append(tokens)
        return answer.energy_of(record, "http://u")

    async def go():
        s = energy_send(send, headers=[(b"x-wattprint-request-id", b"cmpl-1")], fetch=fetch, on_energy=charged.append)
        for m in messages:
            await s(m)

    asyncio.run(go())
    return sent, charged, asked


def _start(ct=b"application/json", status=200, extra=()):
    return {"type": "http.response.start", "status": status,
            "headers": [(b"content-type", ct), (b"content-length", b"999"), *extra]}


def test_json_answer_gets_headers_and_usage_energy():
    body = json.dumps({"id": "cmpl-1", "usage": {"prompt_tokens": 3, "completion_tokens": 7}}).encode()
    sent, charged, asked = _drive([_start(), {"type": "http.response.body", "body": body[:5], "more_body": True},
                                   {"type": "http.response.body", "body": body[5:]}])
    start, out = sent
    h = dict(start["headers"])
    data = json.loads(out["body"])
    assert h[b"content-length"] == str(len(out["body"])).encode() and list(dict(start["headers"])).count(b"content-length") == 1
    assert float(h[b"x-wattprint-energy-j"]) == data["usage"]["energy"]["energy_j"] == 3.0
    assert h[b"x-wattprint-request-id"] == b"cmpl-1" and data["usage"]["completion_tokens"] == 7
    assert asked == [7] and charged == [data["usage"]["energy"]]


def test_unavailable_answer_is_otherwise_unchanged():
    body = b'{"id": "cmpl-1", "usage": {"completion_tokens": 1}}'
    sent, _, _ = _drive([_start(), {"type": "http.response.body", "body": body}], record=None)
    data = json.loads(sent[1]["body"])
    assert data["usage"]["energy"]["status"] == "unavailable" and data["id"] == "cmpl-1"
    assert dict(sent[0]["headers"])[b"x-wattprint-energy-status"] == b"unavailable"


def test_stream_with_usage_chunk_and_without():
    chunks = [b'data: {"choices": [{"text": "a"}], "usage": null}\n\n',
              b'data: {"choices": [], "usage": {"completion_tokens": 2}}\n\n', b"data: [DONE]\n\n"]
    msgs = [_start(b"text/event-stream")] + [{"type": "http.response.body", "body": c, "more_body": True}
                                           for c in chunks] + [{"type": "http.response.body", "body": b""}]
    sent, charged, asked = _drive(msgs)
    bodies = b"".join(m.get("body", b"") for m in sent[1:])
    usage = json.loads(answer.event_data(bodies.split(b"\n\n")[1]))["usage"]
    assert usage["energy"]["energy_j"] == 3.0 and asked == [2] and len(charged) == 1
    assert b": energy" not in bodies and bodies.endswith(b"data: [DONE]\n\n")
    sent, _, asked = _drive([msgs[0], msgs[1], msgs[3], msgs[4]])
    bodies = b"".join(m.get("body", b"") for m in sent[1:])
    comment = [ln for ln in bodies.split(b"\n") if ln.startswith(b": energy ")]
    assert len(comment) == 1 and json.loads(comment[0][9:])["decode_j"] == 2.0 and asked == [None]
    assert bodies.index(b": energy") < bodies.index(b"data: [DONE]")


def test_errors_and_other_types_pass_untouched():
    sent, charged, _ = _drive([_start(status=400), {"type": "http.response.body", "body": b'{"e": 1}'}])
    assert sent[1]["body"] == b'{"e": 1}' and charged == [] and b"x-wattprint-request-id" not in dict(sent[0]["headers"])
    sent, charged, _ = _drive([_start(b"text/plain"), {"type": "http.response.body", "body": b"hi"}])
    assert sent[1]["body"] == b"hi" and charged == []


# -------------------------------------------------------------------------------- the middleware
def _mw_run(mw, body: bytes, headers=(), path="/v1/completions", app=None):
    seen = {}

    async def default_app(scope, receive, send):
        m = await receive()
        seen["body"] = m["body"]
        req = json.loads(m["body"])
        out = json.dumps({"id": "cmpl-1", "usage": {"completion_tokens": 7}, "got": req}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    mw.app = app or default_app
    msgs = [{"type": "http.request", "body": body}]
    sent = []

    async def receive():
        return msgs.pop(0) if msgs else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"x-request-id", b"1"), *headers]}
    asyncio.run(mw(scope, receive, send))
    return sent, seen


def test_middleware_puts_the_sidecar_figure_in_the_answer(sidecar):
    from wattprint.exporters.http import WattprintMiddleware

    server, _ = sidecar
    mw = WattprintMiddleware(None, energy_base_url="http://public.example", url_key=b"k" * 32,
                             lookup=EnergyLookup(f"http://127.0.0.1:{server.server_port}", timeout_s=0.5))
    mw.gate = PolicyGate(parse_policy(POLICY))
    sent, _ = _mw_run(mw, b'{"prompt": "x"}', headers=[(b"x-wattprint-stratum", b"agentic")])
    assert mw.gate.book.state("agentic", time.monotonic()).spent_j == 3.0  # the answer's joules, charged
    mw.gate = None
    h = dict(sent[0]["headers"])
    usage = json.loads(sent[1]["body"])["usage"]
    assert usage["energy"]["energy_j"] == float(h[b"x-wattprint-energy-j"]) == 3.0
    assert usage["energy"]["url"] == h[b"x-wattprint-energy-url"].decode()
    assert usage["energy"]["url"].startswith("http://public.example/v1/requests/cmpl-1?ref=")
    assert h[b"x-wattprint-energy-status"] == b"provisional" and h[b"x-wattprint-source"] == b"simulated"
    down = WattprintMiddleware(None, energy_base_url="http://public.example", url_key=b"k" * 32,
                               lookup=EnergyLookup(f"http://127.0.0.1:{_free_port()}", timeout_s=0.5))
    sent, seen = _mw_run(down, b'{"prompt": "x"}')
    body = json.loads(sent[1]["body"])
    assert body["usage"]["energy"]["status"] == "unavailable" and body["usage"]["completion_tokens"] == 7
    assert dict(sent[0]["headers"])[b"x-wattprint-energy-status"] == b"unavailable"


def test_middleware_policy_rejects_before_the_engine_and_sets_priority(tmp_path):
    from wattprint.exporters.http import WattprintMiddleware

    gate = PolicyGate(parse_policy(POLICY), priority=True)
    mw = WattprintMiddleware(None, energy_base_url="http://x", url_key=b"k" * 32, gate=gate,
                             lookup=EnergyLookup(f"http://127.0.0.1:{_free_port()}", timeout_s=0.2))
    sent, seen = _mw_run(mw, b'{"prompt": "x", "vllm_xargs": {"stratum": "critical"}, "priority": -5}',
                         headers=[(b"authorization", b"Bearer sk-ops")])
    got = json.loads(seen["body"])
    assert got["vllm_xargs"]["stratum"] == "critical" and got["priority"] == 0
    assert dict(sent[0]["headers"])[b"x-wattprint-stratum"] == b"critical"
    # a client without a key claiming critical gets the default stratum, counted
    sent, seen = _mw_run(mw, b'{"prompt": "x"}', headers=[(b"x-wattprint-stratum", b"critical")])
    assert json.loads(seen["body"])["vllm_xargs"]["stratum"] == "unclassified"
    assert gate.refusals["not_allowed"] == 1
    gate.charge("agentic", {"energy_j": 11.0, "status": "final"})
    called = []

    async def never(scope, receive, send):
        called.append(1)

    sent, _ = _mw_run(mw, b'{"prompt": "x"}', headers=[(b"x-wattprint-stratum", b"agentic" + b" " * 10)], app=never)
    assert not called and sent[0]["status"] == 429 and int(dict(sent[0]["headers"])[b"retry-after"]) >= 1
    assert gate.decisions["agentic"]["reject"] == 1
    sent, seen = _mw_run(mw, b'{"prompt": "x"}', headers=[(b"authorization", b"Bearer sk-lab")])
    assert sent[0]["status"] == 200  # another stratum is still served


# ----------------------------------------------------------------------------------- serve --policy
def test_serve_policy_settings(tmp_path, capsys):
    import argparse

    from wattprint import cli
    from wattprint.commands import serve

    assert serve.priority_scheduling(["--model", "m", "--scheduling-policy", "priority"])
    assert serve.priority_scheduling(["--scheduling-policy=priority"])
    assert not serve.priority_scheduling(["--scheduling-policy", "fcfs"]) and not serve.priority_scheduling([])
    args = argparse.Namespace(policy="configs/policy.yaml", energy_wait_ms=20.0, energy_timeout_ms=50.0)
    env = serve.policy_env(args, ["--scheduling-policy", "priority"], str(tmp_path))
    assert env["WATTPRINT_POLICY"].endswith("configs/policy.yaml") and os.path.isabs(env["WATTPRINT_POLICY"])
    assert env["WATTPRINT_PRIORITY"] == "1" and env["WATTPRINT_POLICY_STATS_DIR"] == str(tmp_path)
    assert env["WATTPRINT_ENERGY_WAIT_MS"] == "20"
    args.policy = None
    assert serve.policy_env(args, [], None)["WATTPRINT_POLICY"] == ""  # none inherited from the environment
    bad = tmp_path / "bad.yaml"
    bad.write_text("strata:\n  agentic: {on_breach: maybe}\n")
    assert cli.main(["serve", "--meter", "simulated", "--policy", str(bad), "--", "--model", "x"]) == 2
    assert f"{bad}:2: on_breach" in capsys.readouterr().err


def test_gate_judges_min_class_from_the_answers_ideal_energy():
    gate = PolicyGate(parse_policy("strata:\n  productive: {min_class: B, budget_window_s: 60, on_breach: reject}\n"))
    gate.charge("productive", {"energy_j": 10.0, "status": "provisional"}, ideal_j="junk")  # energy only
    assert gate.admit(None, b"productive").decision.decision == "admit"
    gate.charge("productive", {"energy_j": 10.0, "status": "provisional"}, ideal_j=0.1)  # efficiency 0.01: G
    d = gate.admit(None, b"productive").decision
    assert d.decision == "reject" and d.reason == "class" and d.retry_after_s >= 1
