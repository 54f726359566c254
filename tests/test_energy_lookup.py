"""The middleware's lookup of an answer's energy over the sidecar's lookup socket (ZeroMQ DEALER -> ROUTER):
the same records and the same credential rule as the HTTP API, unavailable (never blocked) when the sidecar
is down, slow or not private, hostile questions counted and harmless, memory bounded."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time

import msgspec
import pytest
import zmq
from test_sidecar import FakeAttributor, ManualTimeline, _hello, _http, _sidecar, _step

from wattprint.exporters.energy_client import EnergyLookup
from wattprint.exporters.energy_zmq import ZmqLookup
from wattprint.profiler.core.records import RequestEntry
from wattprint.profiler.core.results import RequestResult
from wattprint.profiler.sidecar import access
from wattprint.profiler.sidecar.httpapi import RequestAccess
from wattprint.profiler.sidecar.lookup import LookupServer, Question, lookup_address
from wattprint.profiler.sidecar.stats import Counters
from wattprint.profiler.transport import messages as transport
from wattprint.profiler.transport.messages import WireEntry

KEY = b"k" * 32


def _record(rid: str, output_tokens: int = 16) -> RequestResult:
    return RequestResult(id=rid, energy_j=3.0, prefill_j=1.0, decode_j=2.0, kv_j=0.25, kv_read_bytes=0.0,
                         kv_write_bytes=0.0, prompt_tokens=8, output_tokens=output_tokens, flops=1e9,
                         stratum=None, source="simulated", status="provisional")


@pytest.fixture
def server(tmp_path):
    """A lookup server over a store with one request (ref ``r1``, id ``cmpl-1``)."""
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    lock, stats = threading.RLock(), Counters()
    store = {("r1", "cmpl-1"): _record("cmpl-1")}
    acc = RequestAccess(KEY, None, lambda ref, rid: store.get((ref, rid)), lambda rid: None)
    srv = LookupServer(f"ipc://{d}/wp.sock.lookup", acc, lock, stats, poll_ms=20).bind().start()
    yield srv, lock, stats, store
    srv.stop()


def _ask(lk, rid="cmpl-1", ref="r1", sig=None, tokens=None):
    return lk.record(rid, ref, sig or access.sign(KEY, rid, ref), tokens)


def test_records_credentials_and_waiting(server):
    srv, _, _, store = server
    assert stat.S_IMODE(os.stat(srv.socket_file).st_mode) == 0o600
    lk = ZmqLookup(srv.address, timeout_s=0.5)

    async def main():
        got = await _ask(lk)
        assert got["energy_j"] == 3.0 and got["status"] == "provisional" and got["id"] == "cmpl-1"
        assert await _ask(lk, ref="r2") is None  # a valid credential, no such record: 404
        assert await _ask(lk, sig="forged") is None  # 403: counted as a failure
        # concurrent questions pipelined on one socket, each answered with its own record
        store.update({(f"r{i}", f"cmpl-{i}"): _record(f"cmpl-{i}", i) for i in range(2, 40)})
        many = await asyncio.gather(*(_ask(lk, f"cmpl-{i}", f"r{i}") for i in range(2, 34)))
        assert [r["output_tokens"] for r in many] == list(range(2, 34))
        # waiting for the last tokens: asks again until wait_s, then answers the best record seen
        lk.wait_s = 0.05
        t0 = time.monotonic()
        assert (await _ask(lk, tokens=99))["output_tokens"] == 16
        assert 0.04 < time.monotonic() - t0 < 0.5
        store[("r1", "cmpl-1")] = _record("cmpl-1", 99)
        assert (await _ask(lk, tokens=99))["output_tokens"] == 99

    asyncio.run(main())
    assert lk.counts["failed"] == 1 and lk.counts["missing"] == 1 and lk.counts["fallback"] == 0
    assert not lk._pending
    assert asyncio.run(_ask(lk))["energy_j"] == 3.0  # a new event loop: a new socket
    lk.close()


def test_slow_sidecar_times_out_then_trips_and_late_answers_are_dropped(server):
    srv, lock, _, _ = server
    lk = ZmqLookup(srv.address, timeout_s=0.05, trip_after=2, cooldown_s=60)

    async def main():
        assert await _ask(lk) is not None  # connected
        with_lock = threading.Event()

        def hold():
            with lock:
                with_lock.set()
                time.sleep(0.3)

        threading.Thread(target=hold).start()
        with_lock.wait()
        t0 = time.monotonic()
        got = [await _ask(lk) for _ in range(3)]
        assert time.monotonic() - t0 < 0.25 and got == [None, None, None]
        await asyncio.sleep(0.4)  # the late answers arrive and are dropped
        return lk.counts, len(lk._pending)

    counts, pending = asyncio.run(main())
    assert counts["failed"] == 2 and counts["skipped"] == 1 and pending == 0
    lk.close()


def test_sidecar_down_unavailable_at_once_or_fallback(tmp_path, server):
    srv, *_ = server
    d = tmp_path / "empty"
    d.mkdir(mode=0o700)
    down = ZmqLookup(f"ipc://{d}/wp.sock.lookup", timeout_s=0.05)

    async def twice(lk):
        return [await _ask(lk) for _ in range(2)]

    t0 = time.monotonic()
    assert asyncio.run(twice(down)) == [None, None]
    assert time.monotonic() - t0 < 0.2 and down.counts["failed"] == 2
    # with a fallback the question goes there (here: the HTTP API of nobody, refused at once)
    http = EnergyLookup("http://127.0.0.1:9", timeout_s=0.2)
    fb = ZmqLookup(f"ipc://{d}/wp.sock.lookup", timeout_s=0.05, fallback=http)
    assert asyncio.run(_ask(fb)) is None and fb.counts["fallback"] == 1 and fb.counts["failed"] == 1
    # a directory others may write to is not trusted: the socket there is never asked
    srv.stop()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    lk = ZmqLookup(f"ipc://{shared}/wp.sock.lookup", timeout_s=0.05)
    assert asyncio.run(_ask(lk)) is None and lk.counts["failed"] == 1 and lk._sock is None
    for x in (down, fb, lk):
        x.close()


def test_at_most_max_in_flight_questions_wait(server):
    srv, lock, _, _ = server
    lk = ZmqLookup(srv.address, timeout_s=0.2, max_in_flight=4)

    async def main():
        await _ask(lk)
        with lock:  # the sidecar answers nothing meanwhile: questions pile up
            tasks = [asyncio.ensure_future(_ask(lk)) for _ in range(10)]
            await asyncio.sleep(0.01)
            assert len(lk._pending) == 4
        return await asyncio.gather(*tasks)

    got = asyncio.run(main())
    assert sum(r is not None for r in got) == 4 and lk.counts["skipped"] == 6 and not lk._pending
    lk.close()


def test_hostile_questions_are_counted_and_harmless(server):
    srv, _, stats, _ = server
    ctx = zmq.Context()
    try:
        peer = ctx.socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(srv.address)
        for frames in ([b"\xc1garbage"], [b"a", b"b"], [msgspec.msgpack.encode([1, "x"])],
                       [msgspec.msgpack.encode(Question(1, "", "r1", "s"))],
                       [msgspec.msgpack.encode(Question(1, "x" * 600, "r1", "s"))]):
            peer.send_multipart(frames)
        peer.send(b"x" * 10_000)  # over the size limit: ZeroMQ drops the connection
        time.sleep(0.3)
        assert stats.errors().get("lookup_bad_question") == 5
        lk = ZmqLookup(srv.address, timeout_s=5.0)  # the answer, not its latency, is what this checks
        try:
            assert asyncio.run(_ask(lk))["energy_j"] == 3.0  # still serving
        finally:
            lk.close()
    finally:
        ctx.destroy(linger=0)


def test_lookup_address_only_beside_an_ipc_socket():
    assert lookup_address("ipc:///run/x/wp.sock") == "ipc:///run/x/wp.sock.lookup"
    assert lookup_address("tcp://127.0.0.1:5555") is None and lookup_address(None) is None
    with pytest.raises(ValueError):
        ZmqLookup("tcp://127.0.0.1:5555")


def test_middleware_lookup_from_the_environment(monkeypatch, tmp_path):
    from wattprint.exporters import http

    monkeypatch.setenv(transport.ENV_SIDECAR, str(tmp_path / "wp.sock"))
    monkeypatch.delenv(http.ENV_LOOKUP, raising=False)
    lk = http._lookup_from_environment("http://127.0.0.1:1")
    assert isinstance(lk, ZmqLookup) and lk.address == f"ipc://{tmp_path}/wp.sock.lookup"
    assert isinstance(lk.fallback, EnergyLookup) and lk.fallback.port == 1
    monkeypatch.setenv(http.ENV_LOOKUP, "http")
    assert isinstance(http._lookup_from_environment("http://127.0.0.1:1"), EnergyLookup)
    monkeypatch.setenv(http.ENV_LOOKUP, str(tmp_path / "other.lookup"))
    assert http._lookup_from_environment("http://127.0.0.1:1").address == f"ipc://{tmp_path}/other.lookup"
    monkeypatch.delenv(http.ENV_LOOKUP)
    monkeypatch.setenv(transport.ENV_SIDECAR, "tcp://127.0.0.1:5555")
    assert isinstance(http._lookup_from_environment("http://127.0.0.1:1"), EnergyLookup)


# ------------------------------------------------------------------------------ the real sidecar
@pytest.fixture(autouse=True)
def _reset():
    FakeAttributor.created.clear()
    ManualTimeline.instances.clear()


def test_sidecar_serves_its_records_on_the_lookup_socket_and_the_middleware_answers_with_them(tmp_path, monkeypatch):
    from wattprint.exporters.http import ENV_LOOKUP, ENV_TIMEOUT_MS, WattprintMiddleware

    sock = str(tmp_path / "run" / "wp.sock")
    os.makedirs(os.path.dirname(sock), mode=0o700)
    with _sidecar(sock) as sc:
        assert sc.lookup_address == f"ipc://{sock}.lookup"
        assert stat.S_IMODE(os.stat(sock + ".lookup").st_mode) == 0o600
        sc._process([(_hello(), 0.0, False)])
        ManualTimeline.instances[0].push(time.monotonic(), (0.0, 0.0))
        a = "cmpl-abc-0-0a0a0a0a"
        sc._process([(transport.Steps(pid=4242, records=[
            _step(1, [WireEntry(a, 3, 0, 0, ref="ref-a")]), _step(2, [RequestEntry(a, 0, 1, 3, finished=True)])]), 0.0, False)])
        sc.driver.advance(150.0)  # settled: final
        # a generous timeout: the answer, not its latency, is what this checks (a loaded CI machine); and
        # closed whatever happens: a context left open by a failed assertion blocks its garbage collection
        lk = ZmqLookup(sc.lookup_address, timeout_s=5.0)
        try:
            zmq_rec = asyncio.run(_ask_sc(lk, sc.url_key, "cmpl-abc", "ref-a"))
            url = access.energy_url(sc.metrics_url, sc.url_key, "cmpl-abc", "ref-a")
            http_rec = json.loads(_http(url, token=None)[1])
            assert http_rec.pop("j_per_output_token") == http_rec["energy_j"]  # the one field HTTP adds
            assert zmq_rec == http_rec and zmq_rec["status"] == "final" and zmq_rec["output_tokens"] == 1
            assert asyncio.run(_ask_sc(lk, sc.url_key, "cmpl-abc", "ref-b")) is None  # not that request's ref
        finally:
            lk.close()

        # the middleware, configured by the environment as `wattprint serve` does, puts it in the answer
        monkeypatch.setenv(transport.ENV_SIDECAR, sc.address)
        monkeypatch.delenv(ENV_LOOKUP, raising=False)
        monkeypatch.setenv(ENV_TIMEOUT_MS, "5000")  # the record in the answer, not the 50 ms budget, is checked
        def engine(ref):  # the engine runs the request: its steps carry the middleware's ref
            b = "cmpl-abc-0-1b1b1b1b"
            sc._process([(transport.Steps(pid=4242, records=[
                _step(3, [WireEntry(b, 3, 0, 0, ref=ref)]), _step(4, [RequestEntry(b, 0, 1, 3, finished=True)])]), 0.0, False)])
            sc.driver.advance(150.0)

        mw = WattprintMiddleware(_app_answering(engine), energy_base_url="http://public", url_key=sc.url_key,
                                 gate=None)
        assert isinstance(mw.lookup, ZmqLookup)
        try:
            sent = asyncio.run(_call(mw))
            usage = json.loads(sent[1]["body"])["usage"]
            assert usage["energy"]["status"] == "final" and usage["energy"]["energy_j"] == zmq_rec["energy_j"] > 0
            assert mw.lookup.counts["ok"] == 1 and mw.lookup.counts["fallback"] == 0
        finally:
            mw.lookup.close()
        ok, detail = sc.health()
        assert detail["lookups"]["ok"] and detail["lookups"]["answered"] == 3
    assert not os.path.exists(sock + ".lookup")


async def _ask_sc(lk, key, rid, ref):
    return await lk.record(rid, ref, access.sign(key, rid, ref))


def _app_answering(engine):
    async def app(scope, receive, send):
        body = json.loads((await receive())["body"])
        engine(body["vllm_xargs"][access.REF_ARG])
        out = json.dumps({"id": "cmpl-abc", "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": out})

    return app


async def _call(mw):
    sent = []
    msgs = [{"type": "http.request", "body": b'{"prompt": "x"}'}]

    async def receive():
        return msgs.pop(0) if msgs else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"x-request-id", b"abc")]}
    await mw(scope, receive, send)
    return sent


def test_serve_tells_the_server_where_to_look_answers_up(tmp_path):
    from types import SimpleNamespace

    from wattprint.commands import serve
    from wattprint.exporters.http import ENV_LOOKUP

    sock = str(tmp_path / "run" / "wp.sock")
    os.makedirs(os.path.dirname(sock), mode=0o700)
    with _sidecar(sock) as sc:
        env = serve.server_env(sc)
        assert env[ENV_LOOKUP] == f"ipc://{sock}.lookup" and env[transport.ENV_SIDECAR] == f"ipc://{sock}"
    without = SimpleNamespace(address="tcp://127.0.0.1:5555", metrics_url="http://127.0.0.1:9464", url_key=KEY,
                              url_key_file=None, lookup_address=None)
    assert serve.server_env(without)[ENV_LOOKUP] == "http"


def test_a_lookup_socket_that_cannot_be_bound_is_refused_clearly(tmp_path):
    from wattprint.errors import ConfigError

    d = tmp_path / ("d" * 120)  # over the length of a unix socket path
    d.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="cannot bind the lookup socket"):
        LookupServer(f"ipc://{d}/wp.sock.lookup", lambda *a: (404, {}), threading.RLock(), Counters()).bind()
    with pytest.raises(ConfigError):
        LookupServer("tcp://127.0.0.1:1", lambda *a: (404, {}), threading.RLock(), Counters())
