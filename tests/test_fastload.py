"""The offline path's fast loading (issue 12): a Parquet trace read straight into the attribution's compact
columns (no Python object per entry) gives what the JSON-lines records give, refuses the same bad rows
with the same `FILE:ROW: reason`, and the rules it vectorises agree with their scalar forms."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattprint.cli import main
from wattprint.errors import InputError
from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.attribution.compact import CompactTrace
from wattprint.profiler.core import chunkmeta, parallel, records, validate
from wattprint.profiler.core import tracefiles as tf
from wattprint.profiler.core.columnar import table_bytes
from wattprint.profiler.core.records import RequestEntry, StepRecord, StepTimes, encode_line
from wattprint.profiler.twin.simulate import WorkloadSpec, simulate


@pytest.fixture(scope="module")
def trace(tmp_path_factory, llama8b, h100):
    d = tmp_path_factory.mktemp("fast")
    simulate(llama8b, h100, WorkloadSpec(requests=50, rate_rps=8, seed=5)).write(d)
    assert main(["convert", str(d / "steps.jsonl"), str(d / "steps.parquet")]) == 0
    return d


def _compact(g, chunks) -> CompactTrace:
    t = CompactTrace(g)
    for steps, entries in chunks:
        t.add(steps, entries)
    return t


def _same_compact(a: CompactTrace, b: CompactTrace) -> None:
    x, y = a._arrays(), b._arrays()
    assert x.keys() == y.keys()
    for k in x:
        assert np.array_equal(x[k], y[k]), k
    n = len(a.table.ids)
    assert a.table.ids == b.table.ids and a.table.stratum == b.table.stratum
    assert np.array_equal(a.table.data[:, :n], b.table.data[:, :n])


def test_parquet_columns_match_json_records(trace, llama8b):
    whole = _compact(llama8b, records.iter_step_chunks(trace / "steps.jsonl"))
    for batch in (1, 7, 64, 1024):  # 1: the row group's dictionary far larger than a batch
        _same_compact(_compact(llama8b, tf.iter_step_columns_parquet(trace / "steps.parquet", batch)), whole)
    _same_compact(_compact(llama8b, records.iter_step_chunks(trace / "steps.jsonl", chunk_bytes=3000)), whole)


def _steps(rows) -> list[StepRecord]:
    t, steps = 0.0, []
    for k, (reqs, dt) in enumerate(rows):
        steps.append(StepRecord(step=3 * k, t_start=t, t_end=t + dt, requests=reqs))
        t += dt
    return steps


def test_request_metadata_given_anywhere_is_read_alike(tmp_path, llama8b):
    """Stratum and prompt length given on a later entry, the engine's output count on the last, a step
    without entries: the columns give the request table the records give."""
    e = RequestEntry
    steps = _steps([
        ([e("a", 5, 0, 3), e("b", 2, 0, 0, stratum="s1")], 0.1),
        ([], 0.05),
        ([e("a", 0, 1, 8, stratum="s2", prompt_tokens=9), e("b", 0, 1, 2, prompt_tokens=4)], 0.1),
        ([e("a", 0, 1, 9, output_tokens=2, finished=True), e("c", 1, 0, 0)], 0.1),
    ])
    (tmp_path / "s.jsonl").write_bytes(b"".join(map(encode_line, steps)))
    (tmp_path / "s.parquet").write_bytes(table_bytes(tf.steps_table(steps), "steps"))
    ref = _compact(llama8b, records.iter_step_chunks(tmp_path / "s.jsonl"))
    for batch in (1, 2, 10):
        _same_compact(_compact(llama8b, tf.iter_step_columns_parquet(tmp_path / "s.parquet", batch)), ref)
    for chunk_bytes in (40, 150):  # a step or two a chunk, on two cores: the same as sequentially
        _same_compact(_compact(llama8b, _parallel(tmp_path / "s.jsonl", chunk_bytes)),
                      _compact(llama8b, records.iter_step_chunks(tmp_path / "s.jsonl", chunk_bytes)))
    t = ref.table
    assert t.stratum == {0: "s2", 1: "s1"} or t.stratum[t.slots["a"]] == "s2"
    assert t.col("prompt_tokens")[t.slots["a"]] == 9 and t.col("given_output_tokens")[t.slots["a"]] == 2
    assert t.col("cached_tokens")[t.slots["a"]] == 3


entry = st.builds(RequestEntry, id=st.sampled_from(["a", "b", "c", "dé"]), prefill_tokens=st.integers(-1, 40),
                  decode_tokens=st.integers(0, 2), context_tokens=st.integers(0, 1 << 25),
                  stratum=st.none() | st.sampled_from(["x", "y"]), prompt_tokens=st.none() | st.integers(0, 99),
                  output_tokens=st.none() | st.integers(0, 99))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def _outcome(g, chunks):
    """The compact trace the chunks give, or the refusal (reason, line) they end with."""
    try:
        return _compact(g, chunks)
    except InputError as exc:
        return exc.reason, exc.line


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(entry, max_size=5), st.floats(0, 0.5)), min_size=1, max_size=20))
def test_any_trace_gives_the_same_columns_or_refusal(tmp_path, llama8b, rows):
    steps = _steps(rows)
    (tmp_path / "s.jsonl").write_bytes(b"".join(map(encode_line, steps)))
    (tmp_path / "s.parquet").write_bytes(table_bytes(tf.steps_table(steps), "steps"))
    # one chunk each: the engine's output count is read per chunk from a request's last entry there
    want = _outcome(llama8b, records.iter_step_chunks(tmp_path / "s.jsonl"))
    got = _outcome(llama8b, tf.iter_step_columns_parquet(tmp_path / "s.parquet"))
    if isinstance(want, tuple):
        assert got == want
    else:
        _same_compact(got, want)


@pytest.mark.parametrize("row,changes,message", [
    (9, {"step": 2}, "steps out of order"),
    (12, {"t_end": -1.0}, "is before t_start"),
    (5, {"t_start": None}, "field 't_start' is null"),
    (14, {"requests": [{"id": "x", "prefill_tokens": 0, "decode_tokens": 0, "context_tokens": 3}]},
     "scheduled with no tokens"),
    (6, {"requests": [{"id": "x", "prefill_tokens": -2, "decode_tokens": 0, "context_tokens": 3}]},
     "'x' has a negative token count"),
])
def test_bad_rows_are_refused_as_the_records_path_refuses_them(trace, tmp_path, row, changes, message):
    rows = pq.read_table(trace / "steps.parquet").to_pylist()
    rows[row - 1].update(changes)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), bad)
    errors = []
    for read in (lambda: list(tf.iter_step_columns_parquet(bad, 4)), lambda: list(tf.iter_steps_parquet(bad, 4))):
        with pytest.raises(InputError) as exc:
            read()
        errors.append(str(exc.value))
    assert errors[0] == errors[1] and errors[0].startswith(f"{bad}:{row}: ") and message in errors[0]


@given(st.lists(st.integers(0, 4), max_size=30))
def test_step_sums_equal_bincount_by_step(counts):
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    x = np.random.default_rng(len(counts)).random(int(offsets[-1]))
    cols = StepColumns(t_start=np.zeros(len(counts)), t_end=np.zeros(len(counts)), offsets=offsets,
                       req=np.zeros(0), prefill=np.zeros(0), decode=np.zeros(0), context=np.zeros(0), ids=[])
    want = np.bincount(np.repeat(np.arange(len(counts)), counts), x, len(counts))
    assert np.allclose(cols.step_sums(x), want, rtol=1e-12, atol=0)


big = st.integers(-(1 << 63), (1 << 63) - 1) | st.integers(-3, (1 << 24) + 2)


@given(st.lists(st.tuples(big, big, big), max_size=20))
def test_the_entry_rule_on_integer_columns_is_the_float_rule(rows):
    p, d, c = (np.array([r[i] for r in rows], dtype=np.int64) for i in range(3))
    as_float = validate.entries_bad(p.tolist() or np.zeros(0), d.tolist() or np.zeros(0), c.tolist() or np.zeros(0))
    assert np.array_equal(validate.entries_bad(p, d, c), as_float)


def _imports_after_attribute(trace, tmp_path, steps: str) -> set[str]:
    code = ("import sys\nfrom wattprint.cli import main\n"
            f"assert main(['attribute', '--steps', {str(trace / steps)!r}, '--energy', "
            f"{str(trace / 'energy.jsonl')!r}, '--model', 'llama-3.1-8b', '--hardware', 'h100-sxm', '--out', "
            f"{str(tmp_path / 'r.jsonl')!r}, '-q']) == 0\n"
            "print(' '.join(m for m in ('pyarrow', 'pyarrow.compute', 'pandas') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return set(run.stdout.split())


def test_loading_imports_only_what_it_needs(trace, tmp_path):
    """Each import costs start-up time on every run: JSON lines need no pyarrow; Parquet needs neither
    pyarrow's compute kernels nor pandas."""
    assert _imports_after_attribute(trace, tmp_path, "steps.jsonl") == set()
    assert _imports_after_attribute(trace, tmp_path, "steps.parquet") == {"pyarrow"}


@pytest.mark.parametrize("field,value,message", [
    ("prefill_tokens", 10**30, "has a token count over"),
    ("context_tokens", -(10**30), "has a negative token count"),
    ("step", 10**400, "is out of range"),
])
def test_integers_beyond_64_bits_are_refused_naming_the_line(tmp_path, field, value, message):
    """JSON integers are unbounded: one beyond int64 is a bad record (`FILE:LINE: reason`), not a crash."""
    lines = [b'{"step":%d,"t_start":%d,"t_end":%d.5,"requests":[{"id":"r","prefill_tokens":%d,"decode_tokens":0,'
             b'"context_tokens":%d}]}' % (k, k, k, 1 + k, 8 * k) for k in range(4)]
    old = b'"step":2' if field == "step" else b'"%s":%d' % (field.encode(), 3 if field == "prefill_tokens" else 16)
    lines[2] = lines[2].replace(old, b'"%s":%d' % (field.encode(), value))
    path = tmp_path / "steps.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InputError) as exc:
        list(records.iter_step_chunks(path))
    assert str(exc.value).startswith(f"{path}:3: ") and message in str(exc.value)


def _parallel(path, chunk_bytes):
    """steps.jsonl decoded on two cores, this process's and a forked worker's (forced, whatever the cores
    and the file's size)."""
    return parallel.iter_step_columns(path, chunk_bytes, cores=2)


def test_two_cores_give_the_sequential_columns(trace, llama8b):
    path = trace / "steps.jsonl"
    for chunk_bytes in (3000, 1 << 14):
        parts = list(_parallel(path, chunk_bytes))
        assert all(isinstance(t, StepTimes) for t, _ in parts)  # the parallel path ran
        _same_compact(_compact(llama8b, parts), _compact(llama8b, records.iter_step_chunks(path, chunk_bytes)))
    assert not multiprocessing.active_children()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(entry, max_size=5), st.floats(0, 0.5)), min_size=1, max_size=20),
       st.integers(30, 600))
def test_any_trace_on_two_cores_gives_the_same_columns_or_refusal(tmp_path, llama8b, rows, chunk_bytes):
    """Chunks shorter than a line, metadata given on any entry, bad entries: what the sequential path gives."""
    (tmp_path / "s.jsonl").write_bytes(b"".join(map(encode_line, _steps(rows))))
    want = _outcome(llama8b, records.iter_step_chunks(tmp_path / "s.jsonl", chunk_bytes))
    got = _outcome(llama8b, _parallel(tmp_path / "s.jsonl", chunk_bytes))
    if isinstance(want, tuple):
        assert got == want
    else:
        _same_compact(got, want)


def _lines_with(source, tmp_path, k, line):
    lines = source.read_bytes().splitlines(keepends=True)
    path = tmp_path / "steps.jsonl"
    path.write_bytes(b"".join(lines[:k] + [line] + lines[k + 1:]))
    return path


def _changed(line: bytes, change: str, k: int) -> bytes:
    """A steps line (either form) with its step number set back (OLD) or its first request scheduling no
    tokens (NOTOKENS)."""
    d = json.loads(line)
    if change == "OLD":
        d["step"] = k - 2
    else:
        reqs = d["requests"]
        first = reqs[0] if isinstance(reqs, list) else None
        for name in ("prefill_tokens", "decode_tokens"):
            if first is not None:
                first[name] = 0
            else:
                reqs[name][0] = 0
    return json.dumps(d).encode() + b"\n"


@pytest.mark.parametrize("form", ["columns", "entries"])
@pytest.mark.parametrize("where", ["inside", "first"])
@pytest.mark.parametrize("bad,message", [
    (b"{oops\n", "malformed JSON"),
    (b'{"step":1,"t_start":"x","t_end":2,"requests":[]}\n', "invalid record"),
    (b"OLD", "steps out of order"),
    (b'{"step":1,"t_start":0,"t_end":-1,"requests":[]}\n', "is before t_start"),
    (b"NOTOKENS", "scheduled with no tokens"),
])
def test_a_bad_line_in_a_later_chunk_is_named_as_the_sequential_path_names_it(trace, tmp_path, where, bad, message,
                                                                              form):
    """A bad line inside a later chunk (a worker's), or first in its chunk (checked against the chunk
    before by the parent): `FILE:LINE: reason` as read sequentially; no worker left behind. Steps written
    with their requests as columns (what wattprint writes) or one object each (older files)."""
    source = trace / "steps.jsonl"
    if form == "entries":
        source = tmp_path / "entries.jsonl"
        source.write_bytes(b"".join(map(encode_line, records.load_steps(trace / "steps.jsonl").steps)))
    chunk_bytes = 4000 if form == "entries" else 1500
    with open(source, "rb") as f:
        spans = list(parallel._chunk_bounds(f.fileno(), source.stat().st_size, chunk_bytes))
        start, end = spans[len(spans) * 2 // 3 | 1]
        k = first = f.read(start).count(b"\n")
        if where == "inside":  # its last line
            k += f.read(end - start).count(b"\n") - 1
            assert k > first
    old = source.read_bytes().splitlines(keepends=True)[k]
    if bad in (b"OLD", b"NOTOKENS"):
        bad = _changed(old, bad.decode(), k)
    assert bad != old
    path = _lines_with(source, tmp_path, k, bad)
    errors = []
    for chunks in (records.iter_step_chunks(path, chunk_bytes), _parallel(path, chunk_bytes)):
        with pytest.raises(InputError) as exc:
            list(chunks)
        errors.append(str(exc.value))
    assert errors[0] == errors[1] and errors[1].startswith(f"{path}:{k + 1}: ") and message in errors[1]
    assert not multiprocessing.active_children()


def test_workers_stop_when_the_reader_is_interrupted(trace):
    chunks = _parallel(trace / "steps.jsonl", 3000)
    next(chunks)
    assert multiprocessing.active_children()
    with pytest.raises(KeyboardInterrupt):
        chunks.throw(KeyboardInterrupt)  # Ctrl-C while the parent takes a chunk
    assert not multiprocessing.active_children()


def test_metadata_given_on_a_later_entry_of_a_later_chunk(tmp_path, llama8b, monkeypatch):
    """A request whose stratum and prompt length come on a later entry of a later chunk: the worker did
    not look (its first entry there lacks them), so the chunk is decoded again for them, and later chunks
    are scanned in the workers."""
    e = RequestEntry
    rows = [([e("a", 5, 0, 0)], 0.1)] * 40 + [([e("a", 0, 1, 5)], 0.1), ([e("a", 0, 1, 6, stratum="s", prompt_tokens=9)], 0.1)]
    rows += [([e("b", 0, 1, k), e("a", 0, 1, 7 + k)], 0.1) for k in range(40)]
    rows += [([e("b", 0, 1, 40, stratum="t", prompt_tokens=3, output_tokens=41)], 0.1)]
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"".join(map(encode_line, _steps(rows))))
    asked = []
    monkeypatch.setattr(chunkmeta.SparseMeta, "__call__", lambda self, idx, real=chunkmeta.SparseMeta.__call__:
                        asked.append(self.scanned) or real(self, idx))
    for chunk_bytes in (2000, 3000):
        ref = _compact(llama8b, records.iter_step_chunks(path, chunk_bytes))
        _same_compact(_compact(llama8b, _parallel(path, chunk_bytes)), ref)
        t = ref.table
        assert t.stratum[t.slots["a"]] == "s" and t.stratum[t.slots["b"]] == "t"
        assert t.col("prompt_tokens")[t.slots["b"]] == 3 and t.col("given_output_tokens")[t.slots["b"]] == 41
    assert False in asked and True in asked  # both kinds of chunk were read


def _dies_in_a_worker(path, start, end):
    """A chunk's decoding that kills the worker taking it (this function is pickled by name)."""
    import os

    if os.getpid() != _dies_in_a_worker.parent and start > 0:
        os._exit(9)
    return _dies_in_a_worker.real(path, start, end)


def test_a_killed_worker_leaves_the_rest_to_this_process(trace, llama8b, monkeypatch):
    """A worker that dies (the kernel's out-of-memory killer, say): its chunks and the rest are read here,
    with the same result."""
    import os

    monkeypatch.setattr(_dies_in_a_worker, "parent", os.getpid(), raising=False)
    monkeypatch.setattr(_dies_in_a_worker, "real", parallel._decode_chunk, raising=False)
    monkeypatch.setattr(parallel, "_decode_chunk", _dies_in_a_worker)
    path = trace / "steps.jsonl"
    _same_compact(_compact(llama8b, _parallel(path, 3000)), _compact(llama8b, records.iter_step_chunks(path, 3000)))
    assert not multiprocessing.active_children()
