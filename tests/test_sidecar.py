"""The sidecar with a fake attributor and a hand-driven meter timeline, over real ZeroMQ and HTTP."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import stat
import threading
import time
import urllib.error
import urllib.request

import pytest
import zmq
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from wattprint.commands import sidecar as sidecar_command
from wattprint.commands.sidecar import add_arguments as add_sidecar_arguments
from wattprint.commands.sidecar import run as run_sidecar
from wattprint.errors import ConfigError, InputError
from wattprint.exporters.ledger import read_ledger
from wattprint.profiler.core.records import RequestEntry, StepRecord
from wattprint.profiler.core.results import RequestResult, Totals
from wattprint.profiler.meters.base import DeviceInfo, Meter, Reading
from wattprint.profiler.sidecar import daemon as sidecar_mod
from wattprint.profiler.sidecar.daemon import Sidecar, default_hardware
from wattprint.profiler.sidecar.driver import add_totals
from wattprint.profiler.sidecar.recorder import TraceRecorder
from wattprint.profiler.transport import messages as transport
from wattprint.profiler.vllm.ids import request_aliases

LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1000, "torch_dtype": "bfloat16"}
MOE = dict(LLAMA, model_type="mixtral", num_local_experts=8)
J_PER_TOKEN = 0.5


# -------------------------------------------------------------------------------------- fakes
class FakeMeter(Meter):
    def __init__(self, source="nvml", names=("NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3")):
        self.source = source
        self._devices = [DeviceInfo(i, n) for i, n in enumerate(names)]
        self.closed = False

    @property
    def devices(self):
        return self._devices

    def read(self):
        t = time.monotonic()
        return Reading(t, tuple(100.0 * t for _ in self._devices), self.source)

    def close(self):
        self.closed = True


class ManualTimeline:
    """The test pushes readings itself (deterministic); ``start``/``stop`` only record calls."""

    instances: list = []

    def __init__(self, meter, rate_hz, on_reading):
        self.on_reading = on_reading
        self.started = self.stopped = False
        ManualTimeline.instances.append(self)

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True

    def push(self, t_s, energies, source="nvml"):
        self.on_reading(Reading(t_s, tuple(energies), source))


class FakeAttributor:
    """Implements the OnlineAttributor contract with a trivial rule: every token costs J_PER_TOKEN,
    the rest of the measured energy is idle. Steps settle at the first ``advance``."""

    created: list = []

    def __init__(self, geometry, profile, *, n_devices, source, model_name=None, window_s=2.0):
        self.geometry, self.profile, self.n_devices = geometry, profile, n_devices
        self.source, self.model_name, self.window_s = source, model_name, window_s
        self.first: tuple | None = None
        self.last: tuple | None = None
        self.pending: list[StepRecord] = []
        self.reqs: dict[str, dict] = {}
        self.prev_step = None
        self.attributed = 0.0
        self.by_phase: dict = {}
        self.kv: dict = {}
        self.tokens: dict = {}
        self.steps = 0
        self.fail_advance = False
        FakeAttributor.created.append(self)

    def add_step(self, rec: StepRecord):
        if self.prev_step is not None and rec.step <= self.prev_step:
            raise InputError(f"steps out of order: {rec.step} after {self.prev_step}")
        self.prev_step = rec.step
        self.pending.append(rec)

    def add_reading(self, r: Reading):
        if self.first is None:
            self.first = r.energy_j
        self.last = r.energy_j

    def _measured(self):
        if self.first is None:
            return [0.0] * self.n_devices
        return [b - a for a, b in zip(self.first, self.last, strict=True)]

    def _settle(self):
        for rec in self.pending:
            self.steps += 1
            for e in rec.requests:
                q = self.reqs.setdefault(e.id, dict(prefill=0.0, decode=0.0, pt=0, ot=0, stratum=e.stratum,
                                                    t0=rec.t_start, t1=rec.t_end, finished=False, done=False))
                q["t1"] = rec.t_end
                for phase, n in (("prefill", e.prefill_tokens), ("decode", e.decode_tokens)):
                    if not n:
                        continue
                    j = n * J_PER_TOKEN
                    q[phase] += j
                    self.attributed += j
                    s = e.stratum or ""
                    self.by_phase.setdefault(phase, {})[s] = self.by_phase.get(phase, {}).get(s, 0.0) + j
                    self.tokens.setdefault(phase, {})[s] = self.tokens.get(phase, {}).get(s, 0.0) + n
                    self.kv[s] = self.kv.get(s, 0.0) + 0.1 * j
                q["pt"] += e.prefill_tokens
                q["ot"] += e.decode_tokens
                q["finished"] = q["finished"] or e.finished
        self.pending = []

    def _result(self, rid, q, status):
        e = q["prefill"] + q["decode"]
        return RequestResult(id=rid, energy_j=e, prefill_j=q["prefill"], decode_j=q["decode"], kv_j=0.1 * e,
                             kv_read_bytes=100.0, kv_write_bytes=10.0, prompt_tokens=q["pt"],
                             output_tokens=q["ot"], flops=1.0, stratum=q["stratum"], source=self.source,
                             t_start=q["t0"], t_end=q["t1"], model=None, status=status)

    def advance(self, now_s, on_settled=None):
        if self.fail_advance:
            raise RuntimeError("advance bug")
        self._settle()
        out = []
        for rid, q in list(self.reqs.items()):
            if q["finished"] and not q["done"]:
                out.append(self._result(rid, q, "final"))
                del self.reqs[rid]  # final: forgotten
        return out

    def totals(self):
        dev = self._measured()
        measured = sum(dev)
        return Totals(measured_j=measured, attributed_j=self.attributed, idle_j=measured - self.attributed,
                      source=self.source, device_measured_j=dev, steps=self.steps,
                      coefficients={"energy_per_token_j": J_PER_TOKEN},
                      energy_j_by_phase_stratum={k: dict(v) for k, v in self.by_phase.items()},
                      kv_j_by_stratum=dict(self.kv),
                      tokens_by_phase_stratum={k: dict(v) for k, v in self.tokens.items()},
                      kv_read_bytes=100.0 * self.steps, kv_write_bytes=10.0 * self.steps)

    def provisional(self, rid):
        q = self.reqs.get(rid)
        return None if q is None else self._result(rid, q, "provisional")

    def finish(self):
        self._settle()
        out = [self._result(rid, q, "final" if q["finished"] else "provisional") for rid, q in self.reqs.items()]
        self.reqs.clear()
        return out

    def lag_s(self, now_s):
        return 0.5


@pytest.fixture(autouse=True)
def _reset_fakes():
    FakeAttributor.created.clear()
    ManualTimeline.instances.clear()


@pytest.fixture
def sock_path(tmp_path):
    # AF_UNIX paths are limited to ~107 bytes: keep it short
    d = tmp_path if len(str(tmp_path)) < 80 else __import__("tempfile").mkdtemp(prefix="wp")
    return os.path.join(str(d), "wp.sock")


OPERATOR = "operator-token-0123456789"


def _sidecar(sock_path, tmp_path=None, **kw):
    kw.setdefault("metrics_port", 0)
    kw.setdefault("advance_interval_s", 0.05)
    kw.setdefault("clock", lambda: 150.0)  # the steps' clock of these tests (times around 100 s)
    kw.setdefault("operator_token", OPERATOR)
    kw.setdefault("exit_check_s", None)  # the engines of these tests are made-up pids
    kw.setdefault("attributor_factory", FakeAttributor)
    return Sidecar(FakeMeter(kw.pop("source", "nvml")), socket_path=sock_path, timeline_factory=ManualTimeline, **kw)


class Hook:
    """The engine side: a PUSH socket, like the vLLM hook."""

    def __init__(self, address):
        self.ctx = zmq.Context()
        try:
            self.sock = self.ctx.socket(zmq.PUSH)
            self.sock.setsockopt(zmq.LINGER, 1000)
            self.sock.connect(address)
        except BaseException:
            self.close()
            raise

    def send(self, msg):
        self.sock.send(msg if isinstance(msg, bytes) else transport.encode(msg))

    def close(self):
        self.ctx.destroy(linger=0)  # the tests wait for what they sent: nothing unsent is needed


def _step(step, reqs, t0=None, dur=0.01):
    t0 = 100.0 + step * dur if t0 is None else t0
    return StepRecord(step=step, t_start=t0, t_end=t0 + dur, requests=reqs)


def _hello(model="llama-test", config=LLAMA, pid=4242):
    return transport.Hello(pid=pid, model=model, model_config=config)


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def _http(url, accept=None, token=OPERATOR):
    headers = {"Accept": accept} if accept else {}
    if token and "/v1/requests/" in url:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _metrics(sc, openmetrics=False):
    status, text = _http(f"{sc.metrics_url}/metrics",
                         "application/openmetrics-text; version=1.0.0" if openmetrics else None)
    assert status == 200
    fams = list((parse_openmetrics if openmetrics else parse_text)(text))
    return [s for f in fams for s in f.samples]


def _val(samples, metric, **labels):
    vals = [s.value for s in samples if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(vals) if vals else None


# -------------------------------------------------------------------------------------- tests
def test_end_to_end_metrics_lookup_and_ledger(sock_path, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    with _sidecar(sock_path, ledger_path=ledger) as sc:
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        assert sc.metrics_port and sc.metrics_port > 0
        timeline = ManualTimeline.instances[0]
        assert timeline.started
        hook = Hook(sc.address)
        try:
            hook.send(transport.Steps(pid=4242, records=[_step(0, [RequestEntry("early", 5, 0, 0)])]))
            _wait(lambda: sc.snapshot().dropped.get("no_hello") == 1)
            hook.send(_hello())
            _wait(lambda: FakeAttributor.created)
            att = FakeAttributor.created[0]
            assert att.model_name == "llama-test" and att.n_devices == 2 and att.source == "nvml"
            assert att.geometry.layers == 2 and att.profile.name.lower().startswith("h100")
            timeline.push(100.0, (1000.0, 2000.0))
            engine_id = "chatcmpl-abc-1a2b3c4d"
            hook.send(transport.Steps(pid=4242, records=[
                _step(1, [RequestEntry(engine_id, 10, 0, 0, stratum="science"),
                          RequestEntry("cmpl-xyz-0-deadbeef", 4, 0, 0, stratum="bogus")]),
            ]))
            _wait(lambda: sc.lookup("chatcmpl-abc") is not None)
            # the OpenAI response id resolves to the engine id; in flight -> provisional
            status, body = _http(f"{sc.metrics_url}/v1/requests/chatcmpl-abc")
            data = json.loads(body)
            assert status == 200 and data["status"] == "provisional" and data["id"] == engine_id
            assert _http(f"{sc.metrics_url}/v1/requests/unknown")[0] == 404
            hook.send(transport.Steps(pid=4242, records=[
                _step(2, [RequestEntry(engine_id, 0, 1, 10, stratum="science", finished=True),
                          RequestEntry("cmpl-xyz-0-deadbeef", 0, 1, 4, stratum="bogus")]),
            ]))
            timeline.push(101.0, (1500.0, 2300.0))
            _wait(lambda: (sc.lookup(engine_id) or RequestResult("", 0, 0, 0, 0, 0, 0, 0, 0, 0, None, "")).status
                  == "final")
            hook.send(transport.Steps(pid=4242, records=[], dropped_total=3))  # the hook lost 3 records
            status, body = _http(f"{sc.metrics_url}/v1/requests/chatcmpl-abc")
            data = json.loads(body)
            assert data["status"] == "final" and data["energy_j"] == pytest.approx(11 * J_PER_TOKEN)
            assert data["model"] == "llama-test" and data["j_per_output_token"] == pytest.approx(5.5)
            assert json.loads(_http(f"{sc.metrics_url}/v1/requests/cmpl-xyz")[1])["status"] == "provisional"

            samples = _metrics(sc)
            measured = _val(samples, "wattprint_device_energy_joules_total")
            assert measured == pytest.approx(800.0)
            attributed = _val(samples, "wattprint_energy_joules_total")
            assert attributed == pytest.approx(16 * J_PER_TOKEN)
            assert attributed + _val(samples, "wattprint_idle_energy_joules_total") == pytest.approx(measured)
            assert _val(samples, "wattprint_energy_joules_total", phase="prefill", stratum="unclassified") == 2.0
            assert _val(samples, "wattprint_requests_total", model="llama-test", stratum="science") == 1
            assert _val(samples, "wattprint_steps_total") == 2
            assert _val(samples, "wattprint_dropped_records_total", reason="hook_queue_full") == 3
            assert _val(samples, "wattprint_dropped_records_total", reason="no_hello") == 1
            assert _val(samples, "wattprint_device_power_watts", device="0") == pytest.approx(500.0)
            assert _val(samples, "wattprint_attribution_lag_seconds") == 0.5
            assert _val(samples, "wattprint_model_coefficient", name="energy_per_token_j") == J_PER_TOKEN
            assert _val(samples, "wattprint_meter_info", source="nvml", device_name="NVIDIA H100 80GB HBM3") == 1
            assert _val(samples, "wattprint_request_energy_joules_count", stratum="science") == 1
            assert _val(samples, "wattprint_energy_per_output_token_joules_count", stratum="science") == 1

            om = _metrics(sc, openmetrics=True)
            ex = [s for s in om if s.exemplar is not None]
            refs = {s.exemplar.labels["request_id"] for s in ex}  # a pseudonym, not the request id
            assert len(refs) == 1 and engine_id not in refs and "abc" not in next(iter(refs))
            assert all(engine_id not in s.labels.values() for s in om)
            ref = refs.pop()
            assert json.loads(_http(f"{sc.metrics_url}/v1/requests/{ref}")[1])["id"] == engine_id  # operator
            assert _http(f"{sc.metrics_url}/v1/requests/{ref}", token=None)[0] == 401
            assert _http(f"{sc.metrics_url}/v1/requests/{ref}", token="wrong-token-0123456789")[0] == 403

            status, body = _http(f"{sc.metrics_url}/healthz")
            assert status == 200 and json.loads(body)["model"] == "llama-test"
            assert [r["id"] for r in read_ledger(ledger)] == [engine_id]
        finally:
            hook.close()
    # stop(): the in-flight request is settled by finish() and written
    rows = read_ledger(ledger)
    assert [r["id"] for r in rows] == [engine_id, "cmpl-xyz-0-deadbeef"]
    assert rows[0]["model"] == "llama-test" and rows[0]["source"] == "nvml" and rows[0]["stratum"] == "science"
    assert rows[0]["status"] == "final" and rows[1]["status"] == "provisional"  # cut short by the shutdown
    assert sc.snapshot().requests == {("llama-test", "science"): 1}  # provisional ones are not counted
    assert not os.path.exists(sock_path)
    assert ManualTimeline.instances[0].stopped


def test_garbage_invalid_and_unsupported_counted(sock_path):
    with _sidecar(sock_path) as sc:
        hook = Hook(sc.address)
        try:
            hook.send(b"\x00garbage")
            hook.send(b"")
            hook.send(_hello(model="moe", config=MOE))
            hook.send(transport.Steps(pid=4242, records=[_step(0, [RequestEntry("a", 1, 0, 0)]),
                                                         _step(1, [RequestEntry("a", 1, 0, 0)])]))
            _wait(lambda: sc.snapshot().dropped.get("unsupported_model") == 2)
            assert sc.snapshot().dropped["decode_error"] == 2
            # an engine the cost model cannot describe: its devices are metered, every joule idle
            att = FakeAttributor.created[0]
            assert att.model_name == "moe" and att.geometry.name == "unattributed" and not att.pending
            ok, detail = sc.health()
            assert detail["unsupported_model"] == "moe" and detail["engines"][0]["state"] == "unsupported"
            assert sc.snapshot().internal_errors["unsupported_model"] == 1
            hook.send(_hello())
            hook.send(transport.Steps(pid=4242, records=[_step(5, [RequestEntry("a", 1, 0, 0)]),
                                                         _step(4, [RequestEntry("a", 1, 0, 0)])]))
            _wait(lambda: sc.snapshot().dropped.get("invalid_order") == 1)
            snap = sc.snapshot()
            assert snap.steps == 1
            samples = _metrics(sc)
            assert _val(samples, "wattprint_dropped_records_total", reason="decode_error") == 2
            assert _val(samples, "wattprint_dropped_records_total", reason="invalid_order") == 1
        finally:
            hook.close()


def test_internal_queue_full_and_hook_drop_deltas(sock_path):
    sc = _sidecar(sock_path, queue_entries=3)  # not started: drive the receive handler directly
    steps = transport.Steps(pid=7, records=[_step(0, [RequestEntry("a", 1, 0, 0)])] * 2, dropped_total=5)
    on_message = sc.receiver.on_message
    on_message(transport.encode(steps))
    on_message(transport.encode(steps))  # 2 + 2 > 3: dropped
    assert sc.snapshot().dropped == {"hook_queue_full": 5, "queue_full": 2}
    on_message(transport.encode(transport.Steps(pid=7, records=[], dropped_total=9)))
    on_message(transport.encode(transport.Steps(pid=7, records=[], dropped_total=2)))  # new process, same pid
    on_message(transport.encode(transport.Steps(pid=8, records=[], dropped_total=1)))
    assert sc.snapshot().dropped["hook_queue_full"] == 5 + 4 + 2 + 1
    on_message(transport.encode(_hello()))  # a Hello takes no record slot
    assert len(sc.queue) == 2  # messages with no records are not queued


def test_survives_attributor_exceptions(sock_path):
    class Broken(FakeAttributor):
        def add_reading(self, r):
            raise RuntimeError("reading bug")

        def add_step(self, rec):
            if rec.step == 1:
                raise KeyError("step bug")
            super().add_step(rec)

        def provisional(self, rid):
            raise RuntimeError("lookup bug")

    sc = Sidecar(FakeMeter(), socket_path=sock_path, metrics_port=0, advance_interval_s=0.02,
                 attributor_factory=Broken, timeline_factory=ManualTimeline, clock=lambda: 150.0,
                 operator_token=OPERATOR)
    with sc:
        hook = Hook(sc.address)
        try:
            hook.send(_hello())
            _wait(lambda: FakeAttributor.created)
            ManualTimeline.instances[0].push(1.0, (1.0, 1.0))
            FakeAttributor.created[0].fail_advance = True
            hook.send(transport.Steps(pid=4242, records=[_step(1, [RequestEntry("a", 1, 0, 0)]),
                                                      _step(2, [RequestEntry("b", 1, 0, 0, finished=True)])]))
            _wait(lambda: sc.snapshot().internal_errors.get("advance", 0) >= 2)
            snap = sc.snapshot()
            assert snap.dropped["internal_error"] == 1 and snap.steps == 1
            assert snap.internal_errors["reading"] == 1
            assert _http(f"{sc.metrics_url}/v1/requests/a")[0] == 404  # the lookup bug is contained
            FakeAttributor.created[0].fail_advance = False
            _wait(lambda: sc.lookup("b") is not None)
            assert _http(f"{sc.metrics_url}/metrics")[0] == 200
            assert sc.health()[0] is False or sc.health()[0] is True  # health answers
        finally:
            hook.close()


def test_restart_on_same_socket_resumes(sock_path, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    sc1 = _sidecar(sock_path, ledger_path=ledger).start()
    hook = Hook(sc1.address)  # connects once, for the life of the engine
    try:
        hook.send(_hello())
        hook.send(transport.Steps(pid=4242, records=[_step(1, [RequestEntry("done-1", 3, 1, 0, finished=True)])]))
        _wait(lambda: sc1.lookup("done-1") is not None and sc1.lookup("done-1").status == "final")
        sc1.stop()
        sc1.stop()  # idempotent
        assert [r["id"] for r in read_ledger(ledger)] == ["done-1"]

        # a crashed sidecar leaves its socket file behind
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(sock_path)
        stale.close()
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)

        with _sidecar(sock_path, ledger_path=ledger) as sc2:
            # the hook reconnects by itself and says Hello again
            hook.send(_hello())
            hook.send(transport.Steps(pid=4242, records=[
                _step(2, [RequestEntry("done-1", 0, 1, 4, finished=True),  # a replayed id: not written twice
                          RequestEntry("done-2", 2, 1, 0, finished=True)])]))
            _wait(lambda: sc2.lookup("done-2") is not None)
            assert sc2.ledger.duplicates == 1
    finally:
        hook.close()
        sc1.stop()  # on failure before the stop above: its receiving socket closes too
    assert [r["id"] for r in read_ledger(ledger)] == ["done-1", "done-2"]


def test_refuses_live_socket_and_non_socket(sock_path, tmp_path):
    with _sidecar(sock_path) as sc:
        with pytest.raises(ConfigError, match="listening"):
            _sidecar(sock_path).start()
        assert sc.health()[0]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(ConfigError, match="cannot serve metrics"):
            _sidecar(sock_path, metrics_port=busy.getsockname()[1]).start()
    finally:
        busy.close()
    assert not os.path.exists(sock_path)  # cleaned up after the failed start
    plain = tmp_path / "not-a-socket"
    plain.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        _sidecar(str(plain)).start()
    assert plain.read_text() == "precious"


def test_model_change_keeps_counters_monotone(sock_path):
    with _sidecar(sock_path) as sc:
        hook = Hook(sc.address)
        try:
            timeline = ManualTimeline.instances[0]
            hook.send(_hello("model-a"))
            _wait(lambda: len(FakeAttributor.created) == 1)
            timeline.push(1.0, (0.0, 0.0))
            hook.send(transport.Steps(pid=4242, records=[_step(1, [RequestEntry("a1", 4, 0, 0, finished=True)])]))
            timeline.push(2.0, (100.0, 100.0))
            _wait(lambda: sc.lookup("a1") is not None)
            hook.send(_hello("model-a"))  # same engine again: nothing changes
            hook.send(_hello("model-b", dict(LLAMA, num_hidden_layers=4)))
            _wait(lambda: len(FakeAttributor.created) == 2)
            timeline.push(3.0, (0.0, 0.0))
            hook.send(transport.Steps(pid=4242, records=[_step(1, [RequestEntry("b1", 2, 0, 0)])]))
            timeline.push(4.0, (50.0, 50.0))
            _wait(lambda: sc.snapshot().steps == 2)
            samples = _metrics(sc)
            assert _val(samples, "wattprint_device_energy_joules_total") == pytest.approx(300.0)
            assert _val(samples, "wattprint_energy_joules_total", model="model-a") == pytest.approx(2.0)
            _wait(lambda: _val(_metrics(sc), "wattprint_energy_joules_total", model="model-b") == pytest.approx(1.0))
            samples = _metrics(sc)
            total = _val(samples, "wattprint_energy_joules_total") + _val(samples, "wattprint_idle_energy_joules_total")
            assert total == pytest.approx(300.0)
        finally:
            hook.close()


def test_simulated_meter_gets_activity(sock_path):
    observed = []

    class SimMeter(FakeMeter):
        def observe(self, t0, t1, flops, bytes_):
            observed.append((t0, t1, flops, bytes_))

    sc = Sidecar(SimMeter(source="simulated", names=("simulated h100",)), socket_path=sock_path, metrics_port=None,
                 attributor_factory=FakeAttributor, timeline_factory=ManualTimeline, clock=lambda: 150.0)
    assert sc.profile.name.lower().startswith("h100")
    with sc:
        hook = Hook(sc.address)
        try:
            hook.send(_hello())
            hook.send(transport.Steps(pid=4242, records=[_step(1, [RequestEntry("a", 8, 0, 0)])]))
            _wait(lambda: observed)
        finally:
            hook.close()
    t0, t1, flops, bytes_ = observed[0]
    assert t1 > t0 and flops > 0 and bytes_ > 0
    assert sc.metrics_url is None


def test_default_hardware():
    assert default_hardware(FakeMeter("nvml", ("NVIDIA H200",))) == "h200"
    assert default_hardware(FakeMeter("nvml", ("NVIDIA H100 80GB HBM3",))) == "h100-sxm"
    assert default_hardware(FakeMeter("nvml", ("NVIDIA A100-SXM4-80GB",))) == "a100-sxm"
    assert default_hardware(FakeMeter("nvml", ("NVIDIA L4",))) == "l4"
    assert default_hardware(FakeMeter("nvml", ("NVIDIA L40S",))) == "h100-sxm"
    assert default_hardware(FakeMeter("simulated", ("x",))) == "h100-sxm"
    assert default_hardware(FakeMeter("rapl", ("package-0",))) == "cpu"
    assert default_hardware(FakeMeter("cputime-estimate", ("cpu",))) == "cpu"


def test_request_aliases():
    assert request_aliases("chatcmpl-abc-1a2b3c4d") == ["chatcmpl-abc"]
    assert request_aliases("cmpl-abc-0-1a2b3c4d") == ["cmpl-abc-0", "cmpl-abc"]
    assert request_aliases("1_chatcmpl-abc-1a2b3c4d") == ["1_chatcmpl-abc", "chatcmpl-abc"]
    assert request_aliases("plain") == []


def test_lookup_combines_several_engine_requests(sock_path):
    with _sidecar(sock_path) as sc:
        hook = Hook(sc.address)
        try:
            hook.send(_hello())
            hook.send(transport.Steps(pid=4242, records=[_step(1, [
                RequestEntry("cmpl-r-0-00000000", 2, 0, 0, finished=True),
                RequestEntry("cmpl-r-1-11111111", 4, 0, 0)])]))
            _wait(lambda: sc.lookup("cmpl-r") is not None and sc.lookup("cmpl-r-0-00000000") is not None)
            both = sc.lookup("cmpl-r")
            assert both.id == "cmpl-r" and both.energy_j == pytest.approx(3.0) and both.status == "provisional"
            assert both.prompt_tokens == 6
        finally:
            hook.close()


def test_add_totals():
    a = Totals(measured_j=10, attributed_j=4, idle_j=6, source="nvml", device_measured_j=[10.0],
               energy_j_by_phase_stratum={"decode": {"": 4.0}}, kv_j_by_stratum={"": 1.0})
    b = Totals(measured_j=5, attributed_j=5, idle_j=0, source="nvml", device_measured_j=[3.0, 2.0],
               energy_j_by_phase_stratum={"decode": {"": 1.0}, "prefill": {"x": 4.0}})
    c = add_totals(a, b)
    assert c.measured_j == 15 and c.device_measured_j == [13.0, 2.0] and c.idle_j == 6
    assert c.energy_j_by_phase_stratum == {"decode": {"": 5.0}, "prefill": {"x": 4.0}}
    assert a.energy_j_by_phase_stratum == {"decode": {"": 4.0}}  # inputs untouched


def test_run_sidecar_until_sigterm(sock_path, tmp_path, monkeypatch):
    meter = FakeMeter("simulated", ("simulated h100",))
    monkeypatch.setattr(sidecar_command, "open_meter", lambda name: meter)
    monkeypatch.setattr(sidecar_mod, "default_timeline", ManualTimeline)
    parser = add_sidecar_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--meter", "simulated", "--socket", sock_path, "--metrics-port", "0",
                              "--ledger", str(tmp_path / "l.jsonl"), "--window-s", "1.5"])
    seen = {}

    def ready(sc):
        seen["port"] = sc.metrics_port
        seen["health"] = _http(f"{sc.metrics_url}/healthz")[0]
        seen["window"] = sc.window_s
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()

    before = signal.getsignal(signal.SIGTERM)
    assert run_sidecar(args, ready=ready) == 0
    assert seen["port"] > 0 and seen["health"] == 200 and seen["window"] == 1.5
    assert meter.closed and signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(SystemExit):
        parser.parse_args(["--meter", "bogus"])
    with pytest.raises(ConfigError):
        run_sidecar(parser.parse_args(["--window-s", "0"]))


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_engine_restart_with_same_model_starts_a_new_attributor(sock_path):
    old_pid = _dead_pid()  # the engine process that exited
    with _sidecar(sock_path) as sc:
        hook = Hook(sc.address)
        try:
            hook.send(_hello(pid=old_pid))
            hook.send(transport.Steps(pid=old_pid, records=[_step(5, [RequestEntry("old", 2, 0, 0)])]))
            hook.send(_hello(pid=old_pid))  # the same engine's hook reconnected: nothing changes
            _wait(lambda: sc.snapshot().steps == 1)
            assert len(FakeAttributor.created) == 1
            hook.send(_hello(pid=os.getpid()))  # a new engine process: its step numbers start again
            hook.send(transport.Steps(pid=os.getpid(), records=[_step(0, [RequestEntry("new", 2, 0, 0)])]))
            _wait(lambda: sc.snapshot().steps == 2)
            # the exited engine's session was retired: its devices went to the new one
            assert len(FakeAttributor.created) == 2 and not sc.snapshot().dropped
            assert [e["pid"] for e in sc.health()[1]["engines"]] == [os.getpid()]
            old = sc.lookup("old")
            assert old is not None and old.status == "provisional"  # never finished: not counted
            assert sc.snapshot().requests == {}
        finally:
            hook.close()


def test_restart_resumes_with_the_saved_hello(sock_path):
    with _sidecar(sock_path) as sc1:
        hook = Hook(sc1.address)
        try:
            hook.send(_hello(pid=300))
            _wait(lambda: FakeAttributor.created)
        finally:
            hook.close()
    assert stat.S_IMODE(os.stat(sock_path + ".hello").st_mode) == 0o600
    with _sidecar(sock_path) as sc2:
        hook = Hook(sc2.address)
        try:
            # the hook did not say Hello again: a stranger's steps cannot be attributed ...
            hook.send(transport.Steps(pid=999, records=[_step(1, [RequestEntry("x", 1, 0, 0)])]))
            _wait(lambda: sc2.snapshot().dropped.get("no_hello") == 1)
            # ... the same engine's can
            hook.send(transport.Steps(pid=300, records=[_step(7, [RequestEntry("a", 1, 0, 0)])]))
            _wait(lambda: sc2.snapshot().steps == 1)
            assert FakeAttributor.created[-1].model_name == "llama-test"
        finally:
            hook.close()
    with open(sock_path + ".hello", "wb") as f:
        f.write(b"garbage")
    with _sidecar(sock_path) as sc3:  # an unreadable file is ignored
        assert sc3.driver.resume_hello is None


def test_recorder_keeps_the_trace_from_just_before_the_first_step(sock_path):
    rec = TraceRecorder()
    with _sidecar(sock_path, recorder=rec) as sc:
        timeline = ManualTimeline.instances[0]
        hook = Hook(sc.address)
        try:
            for t in (90.0, 97.0, 99.5):  # the engine starting up
                timeline.push(t, (t, t))
            # before any Hello: recorded, though not attributed
            hook.send(transport.Steps(pid=4242, records=[_step(0, [RequestEntry("early", 5, 0, 0)])]))
            hook.send(_hello())
            hook.send(transport.Steps(pid=4242, records=[_step(1, [RequestEntry("a", 4, 0, 0, finished=True)])]))
            _wait(lambda: len(rec.steps()) == 2)
            timeline.push(101.0, (101.0, 101.0))
            assert not rec.complete(1)  # one reading after the last step
            timeline.push(102.0, (103.0, 103.0))
            assert rec.complete(1) and not rec.complete(2)
            assert rec.wait_complete(1, timeout_s=1.0) and not rec.wait_complete(2, timeout_s=0.1)
            assert rec.hello is not None and rec.hello.model == "llama-test"
            assert [s.step for s in rec.steps()] == [0, 1]
            assert sc.snapshot().dropped == {"no_hello": 1} and sc.snapshot().steps == 1
        finally:
            hook.close()
    # the first step starts at 100.0: readings from 98.0 on, then stop()'s last reading
    assert [r.t_s for r in rec.readings()][:3] == [99.5, 101.0, 102.0]
    assert len(rec.readings()) == 4 and len(rec.readings(lead_s=None)) == 6
