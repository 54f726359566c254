"""The online driver's compact store of unsettled steps and its per-batch request intake (issue 9): the
columns it hands to the fit and the settlement are those of the records it was given, whatever the
batches, the settlements and the table's compactions; the request-metadata rule is the offline one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattprint.profiler.attribution.columns import columns_from_steps
from wattprint.profiler.attribution.pending import Intake, PendingSteps, entry_columns
from wattprint.profiler.attribution.table import RequestTable, note_metadata
from wattprint.profiler.core.records import RequestEntry, StepRecord

COLS = ("t_start", "t_end", "offsets", "req", "prefill", "decode", "context", "flops", "kv_read", "kv_write",
        "step_of", "step_flops", "step_bytes", "step_tokens")


def _steps(n_steps, width, seed, t0=0.0, first=0):
    rng = np.random.default_rng(seed)
    out, t = [], t0
    for i in range(n_steps):
        k = int(rng.integers(1, width + 1))
        reqs = [RequestEntry(f"r{int(x)}", int(rng.integers(0, 3)), int(rng.integers(1, 3)), int(rng.integers(0, 900)))
                for x in rng.choice(3 * width, size=k, replace=False)]
        dur = float(rng.uniform(0.001, 0.02))
        out.append(StepRecord(first + i, t, t + dur, reqs))
        t += dur + float(rng.uniform(0.0, 0.005))
    return out


def _feed(store: PendingSteps, table: RequestTable, intake: Intake, steps):
    t0 = np.array([s.t_start for s in steps])
    t1 = np.array([s.t_end for s in steps])
    counts = np.array([len(s.requests) for s in steps])
    reqs = [r for s in steps for r in s.requests]
    seq = store.next_seq + np.repeat(np.arange(len(steps)), counts)
    slots = intake.slots(reqs, np.repeat(t1, counts), None, seq)
    store.append(t0, t1, counts, slots, *entry_columns(reqs))


def _same(a, b):
    for name in COLS:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0, atol=0, err_msg=name)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), width=st.integers(1, 70),
       drops=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6), seed=st.integers(0, 10_000))
def test_columns_are_those_of_the_records(llama8b, sizes, width, drops, seed):
    """Batches appended, heads settled at random times: the live steps' columns equal
    ``columns_from_steps`` of the same records, in any run or selection of them."""
    table = RequestTable()
    intake = Intake(table)
    store = PendingSteps(steps=4, entries=8)  # tiny buffers: every growth and move is exercised
    held: list[StepRecord] = []
    first = 0
    for j, n in enumerate(sizes):
        batch = _steps(n, width, seed + j, t0=held[-1].t_end if held else 0.0, first=first)
        first += n
        _feed(store, table, intake, batch)
        held += batch
        cut = held[0].t_start + drops[j % len(drops)] * (held[-1].t_end - held[0].t_start)
        if j % 2:
            store.drop_settled(cut)
            held = [s for s in held if s.t_end > cut]
        assert len(store) == len(held) and store.n_entries == sum(len(s.requests) for s in held)
        if not held:
            continue
        ref = columns_from_steps(held, llama8b, dict(table.slots), list(table.ids))
        _same(store.columns(np.arange(len(held)), llama8b, table.ids), ref)
        for k in range(0, len(table.ids), 7):  # a request's steps, looked for in its span only
            want = [i for i, s in enumerate(held) if any(table.slots[r.id] == k for r in s.requests)]
            assert store.steps_of(k, -np.inf, *intake.seq[:, k]).tolist() == want
        pick = np.flatnonzero(np.random.default_rng(seed + j).random(len(held)) < 0.5)
        if len(pick):
            sub = columns_from_steps([held[i] for i in pick], llama8b, dict(table.slots), list(table.ids))
            _same(store.columns(pick, llama8b, table.ids), sub)


def test_drop_settled_keeps_steps_out_of_time_order():
    """Steps may overlap by the order check's slack: a settled step behind a live one goes, the live one stays."""
    table = RequestTable()
    intake = Intake(table)
    store = PendingSteps()
    steps = [StepRecord(0, 0.0, 1.0, [RequestEntry("a", 1, 0, 0)]),
             StepRecord(1, 0.9999995, 2.0, [RequestEntry("b", 1, 0, 0), RequestEntry("c", 1, 0, 0)]),
             StepRecord(2, 1.9999995, 1.9999996, [RequestEntry("d", 1, 0, 0)])]
    _feed(store, table, intake, steps)
    store.drop_settled(1.99999965)
    assert len(store) == 1 and store.n_entries == 2
    assert [table.ids[k] for k in store.col("slot")] == ["b", "c"]
    assert store.col("t_end").tolist() == [2.0]


def test_remap_follows_a_compacted_table():
    table = RequestTable()
    intake = Intake(table)
    store = PendingSteps()
    _feed(store, table, intake, [StepRecord(0, 0.0, 0.1, [RequestEntry(i, 1, 0, 0) for i in "ab"]),
                                 StepRecord(1, 0.1, 0.2, [RequestEntry(i, 1, 0, 0) for i in "cbd"])])
    store.drop_settled(0.1)  # the first step is settled: "a" is no longer held
    intake.forget({0})
    new = table.without({0})
    store.remap(intake.compacted(new, np.array([1, 2, 3])))
    assert intake.table is new and new.ids == ["b", "c", "d"]
    assert [new.ids[k] for k in store.col("slot")] == ["c", "b", "d"]
    assert intake.last_t.tolist() == [0.2, 0.2, 0.2]


def test_steps_of_a_request():
    table = RequestTable()
    intake = Intake(table)
    store = PendingSteps()
    steps = [StepRecord(i, i * 0.1, i * 0.1 + 0.05, [RequestEntry("x" if i % 2 else "y", 1, 0, 0)]) for i in range(6)]
    _feed(store, table, intake, steps)
    x = table.slots["x"]
    assert store.steps_of(x, -1.0).tolist() == [1, 3, 5]
    assert store.steps_of(x, 0.36).tolist() == [5]
    assert intake.seq[:, x].tolist() == [1, 5]
    _feed(store, table, intake, [StepRecord(6, 0.6, 0.65, [RequestEntry("z", 1, 0, 0)])])
    store.drop_settled(0.2)  # steps 0 and 1 go: the live ones keep their arrival numbers
    assert store.col("seq").tolist() == [2, 3, 4, 5, 6]
    assert store.steps_of(x, -1.0, *intake.seq[:, x]).tolist() == [1, 3]  # live indices of steps 3 and 5
    assert store.steps_of(table.slots["y"], -1.0, *intake.seq[:, table.slots["y"]]).tolist() == [0, 2]


def test_memory_per_entry_is_compact():
    table = RequestTable()
    intake = Intake(table)
    store = PendingSteps()
    for j in range(40):
        _feed(store, table, intake, [StepRecord(j * 50 + i, (j * 50 + i) * 0.001, (j * 50 + i) * 0.001 + 0.0005,
                                                [RequestEntry(f"r{k}", 0, 1, 100) for k in range(64)])
                                     for i in range(50)])
    assert store.n_entries == 40 * 50 * 64
    assert store.nbytes / store.n_entries <= 16 * 1.5 + 2  # 16 bytes an entry, growth slack


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_metadata_rule_is_the_offline_one(data):
    """First stratum and first prompt length given, cached tokens of the first entry, the finished flag
    and the largest output count: the intake agrees with ``note_metadata`` whatever the batches."""
    ids = [f"q{i}" for i in range(5)]
    entries = data.draw(st.lists(st.tuples(
        st.sampled_from(ids), st.sampled_from([None, "science", "agentic"]), st.sampled_from([None, 0, 7, 12]),
        st.integers(0, 3), st.integers(0, 50), st.booleans(), st.sampled_from([None, 1, 4])), min_size=1, max_size=40))
    reqs = [RequestEntry(i, p, 1 - min(p, 1), c, stratum=s, prompt_tokens=pt, finished=f, output_tokens=o)
            for i, s, pt, p, c, f, o in entries]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(reqs)), max_size=4)))
    ref = RequestTable()
    for r in reqs:
        k = ref.slots.setdefault(r.id, len(ref.ids))
        if k == len(ref.ids):
            ref.ids.append(r.id)
        if r.finished:
            ref.finished.add(k)
    table = RequestTable()
    intake = Intake(table)
    for a, b in zip([0, *cuts], [*cuts, len(reqs)]):
        part = reqs[a:b]
        if part:
            intake.slots(part, np.zeros(len(part)), None)
            note_metadata(ref, part, np.array([ref.slots[r.id] for r in part]))
    assert table.ids == ref.ids and table.finished == ref.finished and table.stratum == {
        k: v for k, v in ref.stratum.items() if v is not None}
    for col in ("prompt_tokens", "cached_tokens"):
        np.testing.assert_array_equal(table.col(col)[:len(ids)], ref.col(col)[:len(ids)])
    given_out = {}
    for r in reqs:
        if r.output_tokens is not None:
            given_out[r.id] = max(given_out.get(r.id, -1), r.output_tokens)
    for rid, k in table.slots.items():
        assert table.col("given_output_tokens")[k] == given_out.get(rid, -1.0)


def test_token_counts_beyond_int32_are_refused():
    store = PendingSteps()
    with pytest.raises(Exception, match="cannot be a real request"):
        store.append(np.zeros(1), np.ones(1), np.array([1]), np.zeros(1, np.int64), np.array([2 ** 40]),
                     np.zeros(1, np.int64), np.zeros(1, np.int64))
