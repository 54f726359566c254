"""The sidecar's ingestion under load (issue 9): the message-wide checks of ``ingest.check_records``
decide exactly as the record rule applied to one record after another; the columns they hand on are
those of the accepted records; consecutive messages of one engine join in the receive queue; losses in
the middle of a batch mark exactly the requests in flight at that point."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sidecar import FakeAttributor, _hello, _sidecar, _step

from wattprint.profiler.core import validate as rule
from wattprint.profiler.core.records import RequestEntry, StepRecord
from wattprint.profiler.sidecar.ingest import check_records
from wattprint.profiler.transport import messages as transport
from wattprint.profiler.transport.receiver import MessageQueue

NOW = 1000.0
_count = st.one_of(st.integers(0, 50), st.integers(0, 50), st.sampled_from([-1, 0, rule.MAX_TOKENS, rule.MAX_TOKENS + 1,
                                                                             2 ** 62, 2 ** 64 - 1]))
_optional = st.one_of(st.none(), st.none(), st.integers(0, 500), st.sampled_from([-3, rule.MAX_TOKENS + 1, 2 ** 40]))
_entry = st.builds(RequestEntry, id=st.one_of(st.sampled_from(["a", "b", "c", "d"]), st.just("x" * 300)),
                   prefill_tokens=_count, decode_tokens=_count, context_tokens=_count, prompt_tokens=_optional,
                   finished=st.booleans(), output_tokens=_optional)
_time = st.one_of(st.floats(990.0, 1000.5), st.floats(990.0, 1000.5),
                  st.sampled_from([math.inf, -math.inf, math.nan, 1e6, -1e6]))


@st.composite
def _records(draw):
    out, num, t = [], draw(st.integers(0, 20)), NOW - 5.0
    for _ in range(draw(st.integers(1, 12))):
        num += draw(st.sampled_from([1, 1, 1, 2, 0, -1, 10_000]))
        t0 = t if draw(st.booleans()) else draw(_time)
        dur = draw(st.sampled_from([0.001, 0.002, -0.5, 4000.0, 0.001]))
        step = num if draw(st.integers(0, 9)) else draw(st.sampled_from([-1, 2 ** 62, 2 ** 64 - 1]))
        out.append(StepRecord(step, t0, t0 + dur, draw(st.lists(_entry, max_size=5))))
        t = t0 + abs(dur) if math.isfinite(t0 + dur) else t
    return out


def _one_by_one(records, prev):
    """The rule applied to one record after another (the order against the last accepted one)."""
    kinds, accepted = [], []
    for rec in records:
        e = rec.requests
        size = rule.size_problem(len(e), max((len(x.id) for x in e), default=0))
        tokens = any(rule.entries_bad(float(x.prefill_tokens), float(x.decode_tokens), float(x.context_tokens))
                     for x in e) or rule.optional_counts_bad([x.prompt_tokens for x in e] + [x.output_tokens for x in e])
        if size:
            kind = "invalid_size"
        elif rule.times_bad(rec.t_start, rec.t_end) or rule.out_of_reach(rec.t_start, rec.t_end, NOW, 600.0, 1.0):
            kind = "invalid_time"
        elif rule.numbers_bad(float(min(rec.step, 1 << 62))):
            kind = "invalid_size"
        elif tokens:
            kind = "invalid_tokens"
        elif prev is not None and rule.order_bad(prev[0], prev[1], rec.step, rec.t_start):
            kind = "invalid_order"
        else:
            kind = None
            accepted.append(rec)
            prev = (rec.step, rec.t_end)
        kinds.append(kind)
    return kinds, accepted, prev


@settings(max_examples=300, deadline=None)
@given(records=_records(), prev=st.one_of(st.none(), st.tuples(st.integers(0, 30), st.floats(990.0, 996.0))))
def test_message_checks_are_the_rule_record_by_record(records, prev):
    kinds, accepted, last = _one_by_one(records, prev)
    c = check_records(records, prev, NOW, max_age_s=600.0, max_ahead_s=1.0)
    assert [k for k, _, _ in c.rejected] == [k for k in kinds if k is not None]
    assert [id(r) for r in c.accepted] == [id(r) for r in accepted] and c.prev == last
    before, n = [], 0
    for k in kinds:
        n += k is None
        if k is not None and (not before or before[-1] != n):
            before.append(n)
    assert list(c.rejected_before) == before
    if not accepted:
        assert c.entries is None
        return
    entries = [x for r in accepted for x in r.requests]
    assert [col.tolist() for col in c.entries] == [[x.prefill_tokens for x in entries], [x.decode_tokens for x in entries],
                                                   [x.context_tokens for x in entries]]
    assert all(col.dtype == np.int64 for col in c.entries)
    got = c.entries.entries
    assert list(got) == entries and got.ids == [x.id for x in entries]
    assert got.finished == [i for i, x in enumerate(entries) if x.finished]
    assert list(zip(got.given, got.output)) == [(i, x.output_tokens) for i, x in enumerate(entries)
                                                if x.output_tokens is not None]
    assert c.entries.counts.tolist() == [len(r.requests) for r in accepted]


# ----------------------------------------------------------------------------- the receive queue
def _msg(*steps, pid=7, session="s1"):
    return transport.Steps(pid=pid, records=[_step(k, [RequestEntry("a", 1, 0, 0)]) for k in steps], session=session)


def test_consecutive_messages_of_one_engine_join_in_the_queue():
    q = MessageQueue(max_entries=100, max_messages=100, merge_entries=6)
    assert q.put(_msg(1, 2), 2, 10) and q.put(_msg(3), 1, 5)  # joins
    assert q.put(_msg(4), 1, 5, gap=True)  # records lost before it: never joins the previous one
    assert q.put(_msg(5, 6), 2, 10)  # joins the one after the gap
    assert q.put(_msg(7, session="other"), 1, 5)  # another engine
    assert q.put(_hello(), 0, 5) and q.put(_msg(8), 1, 5)  # a Hello in between: no join across it
    assert q.put(_msg(9, 10, 11), 3, 5)  # 1 + 3 entries: joins
    assert q.put(_msg(12, 13, 14), 3, 5)  # 4 + 3 entries, over the cap of 6: a new item
    assert q.put(_msg(15), 3, 5) and q.put(_msg(16), 1, 5)  # 3 + 3 = 6: joins; 7: a new item
    items = q.get_all(0)
    steps = [[r.step for r in m.records] if isinstance(m, transport.Steps) else "hello" for m, _, _ in items]
    assert steps == [[1, 2, 3], [4, 5, 6], [7], "hello", [8, 9, 10, 11], [12, 13, 14, 15], [16]]
    assert [gap for _, _, gap in items] == [False, True, False, False, False, False, False]
    assert len(q) == 0 and q._entries == 0 and q._bytes == 0


def test_joined_messages_keep_the_bounds():
    q = MessageQueue(max_entries=3, max_messages=100)
    assert q.put(_msg(1, 2), 2, 10)
    assert not q.put(_msg(3, 4), 2, 10)  # 4 entries > 3: refused, nothing joined
    assert q.put(_msg(3), 1, 10) and not q.put(_msg(4), 1, 10)
    (m, _, _), = q.get_all(0)
    assert [r.step for r in m.records] == [1, 2, 3]


def test_get_some_gathers_a_burst_and_keeps_its_deadline():
    q = MessageQueue(max_entries=100, max_messages=100, gather_s=0.05)
    assert q.get_some(0.01, 100) == []  # nothing: back after the timeout
    q.put(_msg(1), 1, 5)
    q.put(_msg(2), 1, 5)
    (m, _, _), = q.get_some(1.0, 100)
    assert [r.step for r in m.records] == [1, 2]
    small = MessageQueue(max_entries=4, max_messages=100, gather_s=30.0)  # half a bound: no gathering
    small.put(_msg(1), 2, 5)
    t0 = time.monotonic()
    assert len(small.get_some(60.0, 100)) == 1 and time.monotonic() - t0 < 10.0


# ------------------------------------------------------------------------ losses inside a batch
@pytest.mark.parametrize("factory", [FakeAttributor, None], ids=["step by step", "online batch"])
def test_a_loss_inside_a_batch_marks_the_requests_in_flight_there(tmp_path, factory):
    sc = _sidecar(os.path.join(str(tmp_path), "wp.sock"), metrics_port=None, attributor_factory=factory)
    sc._process([(_hello(), 0.0, False)])
    msg = transport.Steps(pid=4242, records=[
        _step(1, [RequestEntry("x", 4, 0, 0)]),
        _step(2, [RequestEntry("x", 0, 1, 4), RequestEntry("bad", -1, 0, 0)]),  # rejected: x was in flight
        _step(3, [RequestEntry("x", 0, 1, 5), RequestEntry("y", 3, 0, 0)]),
        _step(4, [RequestEntry("y", 0, 1, 3)])])
    sc._process([(msg, 0.0, False)])
    (s,) = sc.driver.sessions.values()
    assert set(s.missing) == {"x"} and s.steps == 3
    assert sc.snapshot().dropped == {"invalid_tokens": 1}
    sc.ledger = None
    sc.stop()


# ------------------------------------------------------------------ the columns in the attributor
def test_the_columns_taken_once_give_what_the_records_give():
    """``batch_columns`` and ``Intake.slots`` with the columns the check took (a selection of the steps
    included) give exactly what they give from the records themselves."""
    from wattprint.profiler.attribution.pending import Intake, batch_columns
    from wattprint.profiler.attribution.table import RequestTable

    recs = [_step(k, [RequestEntry(f"r{(k + j) % 5}", j % 2, 1 - j % 2, 3 * k + j, stratum=None if j else "chat",
                                   prompt_tokens=7 if j % 3 else None, finished=(k + j) % 4 == 0,
                                   output_tokens=k if (k + j) % 4 == 0 else None) for j in range(3)], t0=NOW - 5 + k)
            for k in range(6)]
    c = check_records(recs, None, NOW, max_age_s=600.0, max_ahead_s=1.0)
    assert len(c.accepted) == 6
    for accepted in ([0, 1, 2, 3, 4, 5], [0, 2, 5], [4]):
        *plain, reqs, tokens = batch_columns(recs, accepted)
        *taken, entries, tokens2 = batch_columns(recs, accepted, c.entries)
        assert all(np.array_equal(a, b) for a, b in zip(plain, taken))
        assert list(entries) == reqs and entries.ids == [r.id for r in reqs]
        assert all(np.array_equal(a, b) and b.dtype == np.int64 for a, b in zip(tokens, tokens2))
        tables = RequestTable(), RequestTable()
        one, two = Intake(tables[0]), Intake(tables[1])
        t_end = np.repeat(plain[1], plain[2])
        assert np.array_equal(one.slots(reqs, t_end, str.upper), two.slots(entries, t_end, str.upper))
        assert tables[0].ids == tables[1].ids and tables[0].finished == tables[1].finished
        assert tables[0].stratum == tables[1].stratum
        for col in ("given_output_tokens", "prompt_tokens", "cached_tokens"):
            assert np.array_equal(tables[0].col(col), tables[1].col(col))
