"""The online path under load (issue 9): batched ingestion gives the results of step-by-step feeding, the
sidecar's driver feeds a message's records at once and counts every loss, the lag gauge shows the fit's
warm-up, the settled totals are kept by time (``totals_since``), and a closing hook reports its last drops."""

from __future__ import annotations

import os

import msgspec
import numpy as np
import pytest
import zmq
from test_sidecar import _hello, _sidecar, _step

from wattprint.profiler.attribution.coefficients import prior_coefficients
from wattprint.profiler.attribution.online import OnlineAttributor
from wattprint.profiler.attribution.replay import hook_batches
from wattprint.profiler.core.records import RequestEntry, StepRecord
from wattprint.profiler.core.results import Totals
from wattprint.profiler.meters.base import Reading
from wattprint.profiler.sidecar.totals import TotalsHistory
from wattprint.profiler.transport import messages as transport
from wattprint.profiler.transport.sender import DirectSender
from wattprint.profiler.twin.simulate import WorkloadSpec, simulate

FIELDS = ("energy_j", "prefill_j", "decode_j", "kv_j", "compute_j", "weights_j", "static_j", "kv_read_bytes",
          "flops", "prompt_tokens", "output_tokens", "cached_prompt_tokens")


def _run(sim, g, hw, batched: bool, **kw):
    on = OnlineAttributor(g, hw, n_devices=1, source="simulated", **kw)
    msgs = hook_batches(sim.steps)
    events = sorted([(e.t, 0, e) for e in sim.energy] + [(t, 1, b) for t, b in msgs], key=lambda x: (x[0], x[1]))
    out = []
    for t, kind, v in events:
        if kind == 0:
            on.add_reading(Reading(t, (v.energy_j,), "simulated"))
            continue
        if batched:
            assert on.add_steps(v).accepted == list(range(len(v)))
        else:
            for s in v:
                on.add_step(s)
        out += on.advance(t)
    return out + on.finish(), on.totals()


def test_batched_ingestion_gives_the_step_by_step_results(llama8b, h100):
    """With the running fit (its look-ahead and warm-up): every request's record and the totals are the
    same whether a message's steps are added at once or one by one."""
    sim = simulate(llama8b, h100, WorkloadSpec(requests=150, rate_rps=8, seed=41, busy_s=14, quiet_s=3))
    a, ta = _run(sim, llama8b, h100, batched=True, fit_warmup_s=4.0)
    b, tb = _run(sim, llama8b, h100, batched=False, fit_warmup_s=4.0)
    assert [r.id for r in a] == [r.id for r in b] and len(a) == len(sim.truth)
    for x, y in zip(a, b):
        assert x.status == y.status
        for f in FIELDS:
            assert getattr(x, f) == pytest.approx(getattr(y, f), rel=1e-12, abs=1e-12), (x.id, f)
    for f in ("measured_j", "attributed_j", "idle_j", "extrapolated_j", "prefill_j", "decode_j", "steps", "requests"):
        assert getattr(ta, f) == pytest.approx(getattr(tb, f), rel=1e-12), f
    assert ta.attributed_j + ta.idle_j == pytest.approx(ta.measured_j + ta.extrapolated_j, rel=1e-9)


def test_lag_shows_the_warm_up(llama8b, h100):
    """Before anything is settled the lag is the time since the first step (it used to read 0 s)."""
    on = OnlineAttributor(llama8b, h100, n_devices=1, source="simulated")
    assert on.lag_s(5.0) == 0.0  # nothing received
    e = 0.0
    for i in range(400):  # 8 s of steps and readings: still in the fit's 20 s warm-up
        t = 10.0 + 0.02 * i
        on.add_step(StepRecord(i, t, t + 0.015, [RequestEntry("a", 0, 1, 100 + i)]))
        e += 6.0
        on.add_reading(Reading(t + 0.01, (e,), "simulated"))
        assert on.advance(t + 0.02) == []
    assert on.settled_until_s is None and on.pending_steps == 400
    assert on.lag_s(18.0) == pytest.approx(8.0)


def test_a_late_step_in_a_batch_is_counted_and_the_rest_attributed():
    on = OnlineAttributor(*_geometry_and_profile(), n_devices=1, source="simulated",
                          coefficients=[prior_coefficients(_geometry_and_profile()[1], 1)])
    e = 0.0
    for i in range(300):
        e += 3.0
        on.add_reading(Reading(i * 0.01, (e,), "simulated"))
    on.add_steps([StepRecord(0, 0.0, 0.5, [RequestEntry("a", 5, 0, 0, finished=True)])])
    on.advance(10.0)
    assert on.settled_until_s is not None and on.settled_until_s >= 2.0
    added = on.add_steps([StepRecord(1, 0.6, 0.7, [RequestEntry("b", 5, 0, 0)]),
                          StepRecord(0, 0.8, 0.9, [RequestEntry("c", 5, 0, 0)]),  # out of order
                          StepRecord(2, 2.95, 3.1, [RequestEntry("d", 5, 0, 0, finished=True)])])
    assert added.late == [0] and [i for i, _ in added.invalid] == [1] and added.accepted == [2]
    assert on.late_steps == 1 and on.pending_steps == 1


def _geometry_and_profile():
    from wattprint.configs import config_dir
    from wattprint.profiler.core.costmodel import geometry_from_config
    from wattprint.profiler.core.hardware import load_profile

    return geometry_from_config(config_dir() / "models" / "llama-3.1-8b.json"), load_profile("h100-sxm")


def _fixed_factory(g, profile, *, n_devices, source, model_name, window_s):
    return OnlineAttributor(g, profile, n_devices=n_devices, source=source, model_name=model_name,
                            window_s=window_s, coefficients=[prior_coefficients(profile, n_devices)] * n_devices)


def _readings(until_s):
    return [(100.0 + 0.005 * i, [300.0 * 0.005 * i, 200.0 * 0.005 * i]) for i in range(int((until_s - 100.0) / 0.005))]


def test_sidecar_feeds_messages_at_once_with_the_attributor_results(tmp_path):
    """Through the sidecar's driver (a message's records at once): every request gets what the attributor
    fed step by step gives it; a late step is counted and its request reported incomplete; the settled
    totals are kept by time."""
    sc = _sidecar(os.path.join(str(tmp_path), "wp.sock"), metrics_port=None, attributor_factory=_fixed_factory)
    _feed(sc, _hello())
    steps = [_step(i, [RequestEntry(f"r{(i + k) // 20}-{k}", 8 if (i + k) % 20 == 0 else 0,
                                    0 if (i + k) % 20 == 0 else 1, 0 if (i + k) % 20 == 0 else 8 + (i + k) % 20,
                                    stratum="Science", prompt_tokens=8, finished=(i + k) % 20 == 19)
                        for k in range(16)]) for i in range(300)]
    for t, e in _readings(106.0):
        sc._on_reading(Reading(t, tuple(e), "nvml"))
    for i in range(0, 300, 8):
        _feed(sc, transport.Steps(pid=4242, records=steps[i:i + 8]))
    sc.driver.advance(150.0)
    ref = _fixed_factory(sc.driver.sessions["pid:4242"].accounting_geometry(), sc.profile, n_devices=2,
                         source="nvml", model_name="llama-test", window_s=2.0)
    for t, e in _readings(106.0):
        ref.add_reading(Reading(t, tuple(e), "nvml"))
    for s in steps:
        ref.add_step(msgspec.structs.replace(s, requests=[msgspec.structs.replace(r, stratum="science")
                                                         for r in s.requests]))
    expected = {r.id: r for r in ref.advance(150.0)}
    got = {k[1]: r for k, r in sc.results._recent.items()}
    assert expected and sorted(got) == sorted(expected)
    first_prefill: dict[str, bool] = {}
    for st in steps:
        for e in st.requests:
            first_prefill.setdefault(e.id, e.prefill_tokens > 0)
    assert sum(first_prefill.values()) > 100
    for rid, r in expected.items():
        assert got[rid].energy_j == pytest.approx(r.energy_j, rel=1e-12)
        assert got[rid].status == ("final" if first_prefill[rid] else "incomplete")  # seen without its start
        assert got[rid].stratum == "science" and got[rid].prompt_tokens == 8
    late = _step(300, [RequestEntry("late", 4, 0, 0, finished=True)], t0=103.5)
    _feed(sc, transport.Steps(pid=4242, records=[late]))
    assert sc.snapshot().dropped == {"late": 1} and sc.snapshot().steps == 300
    assert sc.driver.sessions["pid:4242"].missing["late"] == "steps"
    window = sc.driver.totals_since(102.0)
    assert window["t_from_s"] == 102.0 and window["t_to_s"] > 103.9
    assert window["measured_j"] == pytest.approx(500.0 * (window["t_to_s"] - 102.0), rel=0.01)  # interpolated
    assert sc.driver.window_from(0.0) == (None, None)  # nothing settled before it: the whole run
    whole = sc.driver.totals_since(0.0)
    total = sc.driver.totals()[0]["llama-test"]
    assert whole["measured_j"] == pytest.approx(total.measured_j) and whole["steps"] == total.steps


def _feed(sc, *msgs):
    sc._process([(m, 0.0, False) for m in msgs])


def _totals(measured, attributed, steps):
    return Totals(measured, attributed, measured - attributed, "nvml", steps=steps)


def test_totals_history_rules():
    h = TotalsHistory(capacity=4)
    assert h.since(0.0) is None
    h.note(10.0, _totals(100.0, 60.0, 10), t_start_s=0.0)
    h.note(20.0, _totals(300.0, 200.0, 30))
    h.note(20.0, _totals(999.0, 0.0, 0))  # not later: ignored
    d = h.since(15.0)  # interpolated halfway between the points at 10 s and 20 s
    assert d["measured_j"] == pytest.approx(100.0) and d["attributed_j"] == pytest.approx(70.0)
    assert d["steps"] == pytest.approx(10.0) and (d["t_from_s"], d["t_to_s"]) == (15.0, 20.0)
    assert h.since(5.0)["measured_j"] == pytest.approx(250.0)  # from the zero point at the start
    assert h.since(-3.0)["measured_j"] == pytest.approx(300.0)  # before anything: everything
    assert h.since(25.0)["measured_j"] == 0.0
    exact, upto = h.window_from(15.0)  # from the point at 10 s: nothing interpolated
    assert exact["t_from_s"] == 10.0 and exact["measured_j"] == pytest.approx(200.0)
    assert exact["attributed_j"] == pytest.approx(140.0) and upto["measured_j"] == pytest.approx(300.0)
    assert h.window_from(5.0) == (None, None)  # only the zero point before: the window is the whole run
    assert h.window_from(-1.0) == (None, None)
    for k in range(3):
        h.note(30.0 + 10 * k, _totals(400.0 + 100 * k, 250.0, 40))
    assert len(h) == 4  # bounded: the oldest points went
    d = h.since(0.0)
    assert d["t_from_s"] == 20.0 and d["measured_j"] == pytest.approx(600.0 - 300.0)


def test_a_closing_sender_reports_its_last_drops(tmp_path):
    """Records dropped after the last message the wire took are reported by a last, empty message."""
    address = f"ipc://{tmp_path}/s.sock"
    ctx = zmq.Context()
    try:
        pull = ctx.socket(zmq.PULL)
        pull.bind(address)
        sender = DirectSender(address)
        sender.send(StepRecord(0, 1.0, 1.1, [RequestEntry("a", 1, 0, 0)]), 1.1, True)
        sender.lost(3)
        sender.close(2.0)
        got = []
        while pull.poll(2000):
            got.append(transport.decode(pull.recv()))
            if got[-1].dropped_total == 3:
                break
        assert [len(m.records) for m in got] == [1, 0] and got[-1].dropped_total == 3
    finally:
        ctx.destroy(linger=0)



def test_checked_records_carry_their_token_columns():
    """The ingestion check hands the accepted records' token columns on (extracted once), rejected
    records' entries left out."""
    from wattprint.profiler.sidecar.ingest import check_records

    recs = [_step(1, [RequestEntry("a", 3, 0, 0), RequestEntry("b", 0, 1, 7)]),
            _step(2, [RequestEntry("c", -1, 0, 0)]),  # invalid tokens
            _step(2, [RequestEntry("d", 0, 2, 9)], t0=100.5),
            _step(1, [RequestEntry("e", 4, 0, 0)], t0=101.0)]  # out of order
    checked = check_records(recs, None, 150.0, max_age_s=600.0, max_ahead_s=1.0)
    assert [r.step for r in checked.accepted] == [1, 2] and [k for k, _, _ in checked.rejected] == [
        "invalid_tokens", "invalid_order"]
    assert [c.tolist() for c in checked.entries] == [[3, 0, 0], [0, 1, 2], [0, 7, 9]]
    assert all(c.dtype.kind == "i" for c in checked.entries)
    on = OnlineAttributor(*_geometry_and_profile(), n_devices=1, source="simulated")
    assert on.add_steps(checked.accepted, entries=checked.entries).accepted == [0, 1]
    assert on.add_steps([_step(3, [RequestEntry("f", 1, 0, 0)], t0=102.0), _step(3, [RequestEntry("g", 2, 0, 0)]),
                         _step(4, [RequestEntry("h", 5, 0, 0)], t0=103.0)],
                        entries=(np.array([1, 2, 5]), np.zeros(3, int), np.zeros(3, int))).accepted == [0, 2]
    cols = on._pending.columns(np.arange(on.pending_steps), on.g, on.table.ids)
    assert cols.prefill.tolist() == [3, 0, 0, 1, 5] and cols.context.tolist() == [0, 7, 9, 0, 0]
