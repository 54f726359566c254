"""Faults and attacks on the sidecar (issue 9): poison records, losses, overload, shared ids, several
engines, squatted and symlinked paths, a full disk, half-open HTTP, 10 k strata and model names. Each
asserts that nothing is lost uncounted and that later requests are still attributed correctly.

Most drive a sidecar that is not started through its message handler (``_process``) and driver, so
that nothing depends on thread timing; the HTTP ones start it."""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import stat
import threading
import time
import urllib.request

import pytest
from test_sidecar import (
    J_PER_TOKEN,
    LLAMA,
    MOE,
    OPERATOR,
    FakeAttributor,
    ManualTimeline,
    _dead_pid,
    _hello,
    _http,
    _metrics,
    _sidecar,
    _step,
    _val,
)

from wattprint.errors import ConfigError, InputError
from wattprint.exporters.api import MetricsServer, make_app
from wattprint.exporters.ledger import Ledger, read_ledger
from wattprint.exporters.prometheus import make_registry
from wattprint.profiler.core import validate as rule
from wattprint.profiler.core.records import RequestEntry
from wattprint.profiler.core.strata import known_strata
from wattprint.profiler.sidecar import access, paths, sinks
from wattprint.profiler.sidecar.sessions import HelloFile
from wattprint.profiler.transport import messages as transport
from wattprint.profiler.transport.messages import WireEntry

PID = 4242


@pytest.fixture(autouse=True)
def _reset():
    FakeAttributor.created.clear()
    ManualTimeline.instances.clear()


@pytest.fixture
def sock_path(tmp_path):
    return os.path.join(str(tmp_path), "wp.sock")


def _feed(sc, *msgs, gap=False):
    sc._process([(m, 0.0, gap) for m in msgs])


def _steps(*records, pid=PID, dropped_total=0, session=""):
    return transport.Steps(pid=pid, records=list(records), dropped_total=dropped_total, session=session)


def _settle(sc):
    sc.driver.advance(150.0)


def _dropped(sc) -> int:
    return sum(sc.snapshot().dropped.values())


def _finals(sc):
    return {k[1]: r for k, r in sc.results._recent.items()}


# ------------------------------------------------------------------------------ poison records
POISON = [
    ("invalid_time", _step(1, [RequestEntry("p", 1, 0, 0)], t0=100.0, dur=math.inf)),
    ("invalid_time", _step(1, [RequestEntry("p", 1, 0, 0)], t0=math.nan)),
    ("invalid_time", _step(1, [RequestEntry("p", 1, 0, 0)], t0=1e6)),  # far in the future
    ("invalid_time", _step(1, [RequestEntry("p", 1, 0, 0)], t0=-1e6)),  # far in the past
    ("invalid_time", _step(1, [RequestEntry("p", 1, 0, 0)], t0=100.0, dur=-1.0)),
    ("invalid_size", _step(2 ** 62, [RequestEntry("p", 1, 0, 0)], t0=100.02)),
    ("invalid_size", _step(2 ** 64 - 1, [RequestEntry("p", 1, 0, 0)], t0=100.02)),
    ("invalid_order", _step(5_000, [RequestEntry("p", 1, 0, 0)], t0=100.02)),  # too far ahead for the time
    ("invalid_tokens", _step(1, [RequestEntry("p", 0, 0, 0)])),
    ("invalid_tokens", _step(1, [RequestEntry("p", -3, 4, 0)])),
    ("invalid_tokens", _step(1, [RequestEntry("p", 2 ** 62, 0, 0)])),
    ("invalid_tokens", _step(1, [RequestEntry("p", 1, 0, 0, output_tokens=-3)])),
    ("invalid_tokens", _step(1, [RequestEntry("p", 1, 0, 0, prompt_tokens=2 ** 40)])),
    ("invalid_size", _step(1, [RequestEntry("p" * 10_000, 1, 0, 0)])),
    ("invalid_size", _step(1, [RequestEntry(f"p{i}", 1, 0, 0) for i in range(rule.MAX_ENTRIES + 1)])),
]


def test_poison_records_rejected_counted_and_harmless(sock_path, tmp_path):
    sc = _sidecar(sock_path, ledger_path=tmp_path / "l.jsonl", metrics_port=None)
    sc._prepare_files()
    _feed(sc, _hello())
    ManualTimeline.push = ManualTimeline.push  # (no timeline: readings are not needed by the fake)
    _feed(sc, _steps(_step(0, [RequestEntry("first", 2, 0, 0, finished=True)])))
    for _, rec in POISON:
        _feed(sc, _steps(rec))
    expected: dict[str, int] = {}
    for kind, _ in POISON:
        expected[kind] = expected.get(kind, 0) + 1
    assert sc.snapshot().dropped == expected
    # 40 later requests, each over two steps: every one attributed, by its own tokens
    for i in range(40):
        _feed(sc, _steps(_step(1 + 2 * i, [RequestEntry(f"r{i}", 3 + i, 0, 0)]),
                         _step(2 + 2 * i, [RequestEntry(f"r{i}", 0, 1, 3 + i, finished=True, output_tokens=1)])))
    _settle(sc)
    finals = _finals(sc)
    for i in range(40):
        r = finals[f"r{i}"]
        assert r.status == "final" and r.energy_j == pytest.approx((4 + i) * J_PER_TOKEN)
    assert sc.snapshot().steps == 81 and sc.snapshot().dropped == expected
    sc.ledger = None
    sc.stop()


def test_hello_checked():
    sc = _sidecar("/nonexistent/wp.sock", metrics_port=None)
    for bad in (_hello(model="m" * 10_000), transport.Hello(pid=-1, model="m", model_config=LLAMA),
                transport.Hello(pid=1, model="m", model_config=LLAMA, tensor_parallel_size=0),
                transport.Hello(pid=1, model="m", model_config=LLAMA, devices=[7]),
                transport.Hello(pid=1, model="m", model_config=LLAMA, session="s" * 100)):
        _feed(sc, bad)
    assert sc.snapshot().dropped == {"invalid_hello": 5} and not sc.driver.sessions


# ----------------------------------------------------------------------------------- losses
def test_lost_records_make_requests_incomplete_not_final(sock_path):
    sc = _sidecar(sock_path, metrics_port=None)
    _feed(sc, _hello())
    _feed(sc, _steps(_step(0, [RequestEntry("a", 4, 0, 0)])))
    # the hook dropped two records while "a" ran (its running drop count grows)
    sc.receiver.on_message(transport.encode(_steps(_step(3, [RequestEntry("a", 0, 1, 4, finished=True)]),
                                                   dropped_total=2)))
    _feed(sc, *[m for m, _, _ in sc.queue.get_all(0)])
    # a request first seen without its prompt (its first steps never arrived) ...
    _feed(sc, _steps(_step(4, [RequestEntry("b", 0, 1, 30)])))
    # ... and step numbers that skip (records lost on the way) while "c" runs
    _feed(sc, _steps(_step(5, [RequestEntry("c", 2, 0, 0)])))
    _feed(sc, _steps(_step(9, [RequestEntry("b", 0, 1, 31, finished=True), RequestEntry("c", 0, 1, 2, finished=True)])))
    _feed(sc, _steps(_step(10, [RequestEntry("d", 2, 0, 0)]), _step(11, [RequestEntry("d", 0, 1, 2, finished=True)])))
    _settle(sc)
    f = _finals(sc)
    assert (f["a"].status, f["a"].missing) == ("incomplete", "steps")
    assert (f["b"].status, f["b"].missing) == ("incomplete", "start")
    assert (f["c"].status, f["c"].missing) == ("incomplete", "steps")
    assert f["d"].status == "final" and f["d"].missing is None  # after the losses: whole again
    assert sc.snapshot().dropped == {"hook_queue_full": 2}
    assert sc.snapshot().requests == {("llama-test", "unclassified"): 1}  # incomplete ones are not counted


def test_late_steps_counted_not_attributed(sock_path):
    class Settling(FakeAttributor):
        late_steps = 0

        def add_step(self, rec):
            if rec.t_end <= 100.5:
                self.late_steps += 1  # its time was settled as idle already
                return
            super().add_step(rec)

    sc = _sidecar(sock_path, metrics_port=None, attributor_factory=Settling)
    _feed(sc, _hello())
    _feed(sc, _steps(_step(1, [RequestEntry("x", 1, 0, 0)], t0=100.0)),
          _steps(_step(2, [RequestEntry("y", 2, 0, 0, finished=True)], t0=101.0)))
    _settle(sc)
    assert sc.snapshot().dropped == {"late": 1} and sc.snapshot().steps == 1
    assert _finals(sc)["y"].status == "final"


def test_overload_bounded_and_every_loss_counted(sock_path):
    sc = _sidecar(sock_path, metrics_port=None, queue_entries=2_000, queue_bytes=1 << 20)
    _feed(sc, _hello())
    sent = 0
    for n in range(400):  # a burst the worker cannot drain: 400 messages x 8 records x 64 entries
        recs = [_step(8 * n + k + 1, [RequestEntry(f"q{n}-{j}", 1, 0, 0, finished=True) for j in range(64)],
                      t0=100.0 + (8 * n + k) * 1e-4, dur=1e-4) for k in range(8)]
        sc.receiver.on_message(transport.encode(_steps(*recs)))
        sent += len(recs)
        assert sc.queue._entries <= 2_000 and sc.queue._bytes <= 1 << 20  # bounded whatever arrives
    queued = sc.queue.get_all(0)
    _feed(sc, *[m for m, _, _ in queued])
    snap = sc.snapshot()
    assert snap.dropped["queue_full"] > 0
    assert snap.steps + sum(snap.dropped.values()) == sent  # every record accepted or counted
    # the backlog shows in the lag gauge
    sc.queue.put(_steps(_step(10_000, [RequestEntry("z", 1, 0, 0)])), 1, 10, t=time.monotonic() - 42.0)
    assert sc.snapshot().lag_s >= 42.0


def test_implausible_hook_drop_count_not_added(sock_path):
    sc = _sidecar(sock_path, metrics_port=None)
    sc.receiver.on_message(transport.encode(_steps(dropped_total=10 ** 15)))
    sc.receiver.on_message(transport.encode(_steps(dropped_total=3)))
    sc.receiver.on_message(transport.encode(_steps(dropped_total=10 ** 15)))  # +1e15 in a moment: no
    assert sc.snapshot().dropped == {"hook_queue_full": 3}
    assert sc.snapshot().internal_errors == {"implausible_drop_count": 2}


# --------------------------------------------------------------------------------- shared ids
def test_shared_request_id_separate_records_each_url_leads_to_its_own(sock_path):
    with _sidecar(sock_path) as sc:
        _feed(sc, _hello())
        ManualTimeline.instances[0].push(time.monotonic(), (0.0, 0.0))
        # two clients sent X-Request-Id "same": vLLM's own ids differ, the middleware gave each a ref
        a, b = "chatcmpl-same-0a0a0a0a", "chatcmpl-same-1b1b1b1b"
        _feed(sc, _steps(_step(1, [WireEntry(a, 3, 0, 0, ref="ref-a"), WireEntry(b, 800, 0, 0, ref="ref-b")]),
                         _step(2, [RequestEntry(a, 0, 1, 3, finished=True), RequestEntry(b, 0, 1, 800)]),
                         _step(3, [RequestEntry(b, 0, 1, 801, finished=True)])))
        _settle(sc)
        rid = "chatcmpl-same"
        url_a = access.energy_url(sc.metrics_url, sc.url_key, rid, "ref-a")
        url_b = access.energy_url(sc.metrics_url, sc.url_key, rid, "ref-b")
        ra, rb = (json.loads(_http(u, token=None)[1]) for u in (url_a, url_b))
        assert (ra["id"], ra["prompt_tokens"], ra["output_tokens"]) == (a, 3, 1)
        assert (rb["id"], rb["prompt_tokens"], rb["output_tokens"]) == (b, 800, 2)
        assert ra["energy_j"] == pytest.approx(4 * J_PER_TOKEN) and rb["energy_j"] == pytest.approx(802 * J_PER_TOKEN)
        base = f"{sc.metrics_url}/v1/requests/{rid}"
        assert _http(base, token=None)[0] == 401
        assert _http(url_a.replace("ref=ref-a", "ref=ref-b"), token=None)[0] == 403  # a's signature, b's ref
        assert _http(base + "?ref=ref-a&sig=forged", token=None)[0] == 403
        assert _http(base, token="not-the-operator-token")[0] == 403
        both = json.loads(_http(base)[1])  # the operator sees everything under that name
        assert both["prompt_tokens"] == 803


def test_aliases_computed_once_per_request(sock_path, monkeypatch):
    calls = []
    real = sinks.request_aliases
    monkeypatch.setattr(sinks, "request_aliases", lambda rid: calls.append(rid) or real(rid))
    sc = _sidecar(sock_path, metrics_port=None)
    _feed(sc, _hello())
    for n in range(50):
        _feed(sc, _steps(_step(n + 1, [RequestEntry(f"chatcmpl-{j}-0a0a0a0a", 1 if n == 0 else 0, 0 if n == 0 else 1,
                                                     n) for j in range(64)])))
    assert len(calls) == 64


# ------------------------------------------------------------------------------- two engines
def test_two_engines_side_by_side(sock_path):
    sc = _sidecar(sock_path, metrics_port=None)
    _feed(sc, transport.Hello(pid=os.getpid(), model="m-a", model_config=LLAMA, session="a"))
    assert sc.driver.sessions["s:a"].devices == (0, 1)  # alone: every device
    _feed(sc, transport.Hello(pid=os.getpid(), model="m-b", model_config=dict(LLAMA, num_hidden_layers=4),
                              session="b", devices=[1]))
    # b named its device: a gives it up (settled and started again on device 0)
    assert sc.driver.sessions["s:a"].devices == (0,) and sc.driver.sessions["s:b"].devices == (1,)
    att_a, att_b = sc.driver.sessions["s:a"].attributor, sc.driver.sessions["s:b"].attributor
    assert att_a.n_devices == 1 and att_b.n_devices == 1
    sc._on_reading(__import__("wattprint.profiler.meters.base", fromlist=["Reading"]).Reading(100.0, (0.0, 0.0), "nvml"))
    for i in range(30):  # overlapping steps of two engines, same step numbers, same request ids
        for s in ("a", "b"):
            _feed(sc, _steps(_step(2 * i + 1, [RequestEntry(f"r{i}", 2, 0, 0)], t0=100 + i * 0.01, dur=0.004),
                             _step(2 * i + 2, [RequestEntry(f"r{i}", 0, 1, 2, finished=True)], t0=100.005 + i * 0.01,
                                   dur=0.004), pid=os.getpid(), session=s))
        _feed(sc, transport.Hello(pid=os.getpid(), model="m-a", model_config=LLAMA, session="a"))  # reconnects
    sc._on_reading(__import__("wattprint.profiler.meters.base", fromlist=["Reading"]).Reading(101.0, (60.0, 40.0), "nvml"))
    _settle(sc)
    f = sc.results._recent
    assert len(f) == 60 and all(r.status == "final" for r in f.values())
    assert {k[0] for k in f} == {"s:a", "s:b"}
    assert sc.snapshot().dropped == {} and sc.snapshot().steps == 120
    totals, _ = sc.driver.totals()
    assert set(totals) == {"m-a", "m-b"}
    assert totals["m-b"].device_measured_j == [0.0, 40.0] and totals["m-a"].device_measured_j[1] == 0.0
    # an engine the cost model cannot describe, with no device left: reported, its steps counted
    _feed(sc, transport.Hello(pid=os.getpid(), model="moe", model_config=MOE, session="c"))
    _feed(sc, _steps(_step(1, [RequestEntry("m", 1, 0, 0)]), pid=os.getpid(), session="c"))
    states = {e["model"]: e["state"] for e in sc.health()[1]["engines"]}
    assert states == {"m-a": "attributing", "m-b": "attributing", "moe": "unsupported"}
    assert sc.snapshot().dropped == {"unsupported_model": 1}
    # the others go on
    _feed(sc, _steps(_step(61, [RequestEntry("after", 2, 0, 0, finished=True)], t0=101.0), pid=os.getpid(), session="a"))
    _settle(sc)
    assert sc.results._recent[("s:a", "after")].status == "final"


def test_unsupported_engine_devices_conserve_energy():
    from wattprint.profiler.meters.base import Reading

    sc = _sidecar("/nonexistent/wp.sock", metrics_port=None)
    _feed(sc, _hello(model="moe", config=MOE))
    sc._on_reading(Reading(100.0, (10.0, 20.0), "nvml"))
    sc._on_reading(Reading(101.0, (110.0, 70.0), "nvml"))
    totals, _ = sc.driver.totals()
    t = totals["moe"]
    assert t.measured_j == pytest.approx(150.0) and t.attributed_j == 0 and t.idle_j == pytest.approx(150.0)


# ------------------------------------------------------------------------ squatted and symlinked
def test_private_dir_refuses_squatted_and_symlinked(tmp_path):
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    if os.getuid() == 0:
        os.chown(other, 65534, 65534)  # another user's directory
        with pytest.raises(ConfigError, match="belongs to uid"):
            paths.ensure_private_dir(str(other))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by other users"):
        paths.ensure_private_dir(str(shared))
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "mine")
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConfigError, match="not a directory"):
        paths.ensure_private_dir(str(link))
    readable = tmp_path / "readable"
    readable.mkdir()
    readable.chmod(0o755)
    paths.ensure_private_dir(str(readable))
    assert stat.S_IMODE(readable.stat().st_mode) == 0o700


def test_default_socket_in_a_private_directory(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    monkeypatch.delenv("WATTPRINT_SIDECAR", raising=False)
    assert transport.default_socket() == str(run / "wattprint" / "sidecar.sock")
    with _sidecar(None, metrics_port=None) as sc:
        d = run / "wattprint"
        assert sc.socket_file == str(d / "sidecar.sock")
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert stat.S_IMODE(os.stat(sc.socket_file).st_mode) == 0o600
        assert stat.S_IMODE((d / "url.key").stat().st_mode) == 0o600
    # a runtime directory others can write to is not used: a per-user directory instead, never /tmp
    run.chmod(0o777)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    if os.getuid() != 0:
        assert transport.runtime_dir() == str(tmp_path / "home" / ".local" / "state" / "wattprint" / "run")
    assert not transport.runtime_dir().startswith("/tmp")


def test_hello_file_symlink_and_planted_file(sock_path, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("root's file")
    os.symlink(victim, sock_path + ".hello")
    hf = HelloFile(sock_path + ".hello")
    assert hf.load() == []  # a symlink is not read
    hf.save([_hello()])  # replaces the link, never writes through it
    assert victim.read_text() == "root's file" and not os.path.islink(sock_path + ".hello")
    assert stat.S_IMODE(os.stat(sock_path + ".hello").st_mode) == 0o600
    assert [h.model for h in hf.load()] == ["llama-test"]
    # a planted file others can write (or not ours) is ignored: no injected model label
    os.unlink(sock_path + ".hello")
    with open(sock_path + ".hello", "wb") as f:
        f.write(__import__("msgspec").msgpack.encode([_hello(model="injected")]))
    os.chmod(sock_path + ".hello", 0o666)
    assert hf.load() == []
    with _sidecar(sock_path, metrics_port=None) as sc:
        assert sc.driver.saved == {}


def test_ledger_private_symlink_refused_and_mode(tmp_path):
    path = tmp_path / "l.jsonl"
    with Ledger(path):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    with Ledger(path):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # tightened
    with Ledger(path, mode=0o640):
        pass
    g = tmp_path / "g.jsonl"
    with Ledger(g, mode=0o640):
        pass
    assert stat.S_IMODE(g.stat().st_mode) == 0o640
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InputError, match="symlink"):
        Ledger(link)
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(InputError, match="regular file"):
        Ledger("/dev/full")  # the start-up check: not a file we can keep whole lines in


# ---------------------------------------------------------------------------------- full disk
def test_full_disk_truncates_counts_and_makes_health_fail(sock_path, tmp_path, monkeypatch):
    from wattprint.exporters import ledger as ledger_mod

    path = tmp_path / "l.jsonl"
    real_write = os.write
    state = {"full": False}

    def write(fd, data):
        if state["full"] and fd == sc.ledger._fd:
            n = real_write(fd, bytes(data)[: len(data) // 2])  # half a line reaches the disk, then ENOSPC
            if n:
                state["half"] = True
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    with _sidecar(sock_path, ledger_path=path) as sc:
        ManualTimeline.instances[0].push(time.monotonic(), (0.0, 0.0))
        monkeypatch.setattr(ledger_mod.os, "write", write)
        _feed(sc, _hello(), _steps(_step(1, [RequestEntry("a", 2, 0, 0, finished=True)])))
        _settle(sc)
        state["full"] = True
        _feed(sc, _steps(_step(2, [RequestEntry("b", 2, 0, 0, finished=True)])))
        _settle(sc)
        assert state.get("half")
        assert path.read_bytes().endswith(b"\n") and [r["id"] for r in read_ledger(path)] == ["a"]
        assert sc.snapshot().internal_errors["ledger"] == 1 and sc.ledger.failed_writes == 1
        ManualTimeline.instances[0].push(time.monotonic(), (0.0, 0.0))
        status, body = _http(f"{sc.metrics_url}/healthz")
        assert status == 503 and json.loads(body)["ledger"]["ok"] is False
        state["full"] = False  # space again: the kept line is written before the next
        _feed(sc, _steps(_step(3, [RequestEntry("c", 2, 0, 0, finished=True)])))
        _settle(sc)
        assert [r["id"] for r in read_ledger(path)] == ["a", "b", "c"]
        assert sc.ledger.healthy and _http(f"{sc.metrics_url}/healthz")[0] == 200
        lines = path.read_bytes().split(b"\n")
        assert all(json.loads(x) for x in lines if x)  # only whole lines


# ----------------------------------------------------------------------------------- HTTP
def test_half_open_http_bounded_threads_and_time(sock_path):
    app = make_app(make_registry(lambda: __import__("wattprint.exporters.prometheus", fromlist=["x"]).MetricsSnapshot(
        source="nvml")), None, lambda: (True, {}))
    server = MetricsServer(app, "127.0.0.1", 0, workers=4, read_timeout_s=0.5, request_deadline_s=1.0).start()
    conns = []
    base_threads = threading.active_count()
    try:
        for _ in range(300):  # half-open requests: a request line started, never finished
            c = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            conns.append(c)
        time.sleep(0.3)
        assert threading.active_count() <= base_threads + 4 + 1
        t0 = time.monotonic()
        try:
            status = urllib.request.urlopen(f"{server.url}/metrics", timeout=5).status
        except urllib.error.HTTPError as e:
            status = e.code
        assert status in (200, 503) and time.monotonic() - t0 < 5.0  # answered or refused, never hung
        time.sleep(2.5)  # deadlines passed: workers free again
        assert urllib.request.urlopen(f"{server.url}/metrics", timeout=5).status == 200
    finally:
        for c in conns:
            c.close()
        server.stop()


# --------------------------------------------------------------------------- unbounded growth
def test_10k_strata_and_model_names_stay_bounded(sock_path):
    sc = _sidecar(sock_path, max_models=4, max_sessions=8)
    _feed(sc, _hello())
    ManualTimeline.instances.clear()
    for n in range(100):
        _feed(sc, _steps(_step(n + 1, [RequestEntry(f"r{n}-{j}", 1, 0, 0, stratum=f"s{n}-{j}" * 8, finished=True)
                                       for j in range(100)])))
    _settle(sc)
    totals, _ = sc.driver.totals()
    keys = set(totals["llama-test"].energy_j_by_phase_stratum.get("prefill", {}))
    assert keys <= set(known_strata()) | {"unclassified"}
    assert {r.stratum for r in sc.results._recent.values()} <= set(known_strata()) | {"unclassified"}
    dead = _dead_pid()
    for n in range(10_000):  # 10k engines each with its own model name
        _feed(sc, transport.Hello(pid=dead, model=f"model-{n}", model_config=LLAMA, session=f"x{n}"))
    assert len(sc.driver.sessions) <= 8 and len(sc.driver.saved) <= 256
    labels = {s.label for s in sc.driver.sessions.values()} | set(sc.driver.base_totals)
    assert len(labels) <= 5 and "other" in labels
    sc.start()
    try:
        text = _http(f"{sc.metrics_url}/metrics")[1]
        assert len(text) < 200_000
        models = {s.labels.get("model") for s in _metrics(sc) if "model" in s.labels}
        assert len(models) <= 5
    finally:
        sc.stop()


def test_live_engines_beyond_the_session_limit_are_refused_and_counted(sock_path):
    sc = _sidecar(sock_path, metrics_port=None, max_sessions=4)
    for n in range(10):
        _feed(sc, transport.Hello(pid=os.getpid(), model="m", model_config=LLAMA, session=f"live{n}"))
    assert len(sc.driver.sessions) == 4 and sc.snapshot().internal_errors["session_limit"] == 6


def test_operator_token_required_for_names(sock_path):
    with _sidecar(sock_path) as sc:
        _feed(sc, _hello(), _steps(_step(1, [RequestEntry("chatcmpl-q-0a0a0a0a", 2, 0, 0)])))
        _settle(sc)
        url = f"{sc.metrics_url}/v1/requests/chatcmpl-q"
        assert _http(url, token=None)[0] == 401
        assert _http(url, token=OPERATOR)[0] == 200
        assert _val(_metrics(sc), "wattprint_steps_total") == 1
