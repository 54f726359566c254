"""The vLLM step hook against the real vLLM CPU engine (no mocks of vLLM).

One engine for the module (``vllm.LLM`` on the tiny model, EngineCore in its child process where the
plugin loads), a test PULL socket on a temporary ipc path, and checks of what arrives.
"""

from __future__ import annotations

import gc
import math
import os
import threading
import time
from collections import defaultdict

import pytest
import zmq

from wattprint.profiler.core.records import StepRecord, validate_steps
from wattprint.profiler.transport import messages as transport
from wattprint.profiler.transport.sender import SENDERS, DirectSender
from wattprint.profiler.vllm import plugin
from wattprint.profiler.vllm.ids import strip_random_suffix

MAX_BATCHED = 64
SNDHWM = 32  # small, so that a missing sidecar makes the hook drop quickly


# -- no engine needed ----------------------------------------------------------------------------


def test_strip_random_suffix():
    assert strip_random_suffix("0-1a2b3c4d") == "0"
    assert strip_random_suffix("cmpl-abc-0-deadbeef") == "cmpl-abc-0"
    assert strip_random_suffix("1_chatcmpl-xyz-0123abcd") == "1_chatcmpl-xyz"
    assert strip_random_suffix("plain") == "plain"
    assert strip_random_suffix("x-DEADBEEF") == "x-DEADBEEF"  # uuid hex is lower case
    assert strip_random_suffix("-12345678") == "-12345678"  # nothing would be left


def test_register_without_sidecar_is_a_no_op(monkeypatch):
    monkeypatch.setattr(plugin, "_state", {"done": False, "installed": False})
    monkeypatch.delenv(transport.ENV_SIDECAR, raising=False)
    plugin.register()
    assert not plugin.installed() and not plugin._state["done"]


def test_register_failure_is_one_warning_and_no_hook(monkeypatch):
    import logging

    from wattprint.profiler.vllm import hook

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    def broken(address=None):
        raise RuntimeError("unknown vLLM internals: Scheduler.schedule missing")

    monkeypatch.setattr(plugin, "_state", {"done": False, "installed": False})
    monkeypatch.setenv(transport.ENV_SIDECAR, "/tmp/wattprint-test-never-bound.sock")
    monkeypatch.setattr(hook, "install", broken)
    keep = Keep()
    plugin.logger.addHandler(keep)  # vLLM's logging config may stop propagation to the root logger
    try:
        plugin.register()
        plugin.register()  # at most once per process
    finally:
        plugin.logger.removeHandler(keep)
    assert not plugin.installed()
    warnings = [r for r in keep.records if "not installed" in r.getMessage()]
    assert len(warnings) == 1 and "Scheduler.schedule missing" in warnings[0].getMessage()


@pytest.mark.parametrize("sender_kind", sorted(SENDERS))
def test_observer_async_order_recompute_and_finish(tmp_path, sender_kind):
    """The observer on vLLM's call order with async scheduling (the CPU engine never schedules
    asynchronously): schedule(n+1) before update_from_output(n). Plain objects stand in for vLLM's
    Request / Scheduler / SchedulerOutput; the scheduler advances num_computed_tokens in schedule()."""
    from types import SimpleNamespace as NS

    from wattprint.profiler.vllm.observer import StepObserver

    RUNNING, PREEMPTED, FINISHED = 5, 6, 7
    address = f"ipc://{tmp_path}/obs.sock"
    ctx = zmq.Context()
    obs = None
    try:
        pull = ctx.socket(zmq.PULL)
        pull.bind(address)
        obs = StepObserver(SENDERS[sender_kind](address, hwm=1000), finished_above=PREEMPTED)
        obs.hello = transport.encode(transport.Hello(pid=1, model="m", model_config={}))

        def req(rid, prompt, outputs=0, computed=0, stratum=None):
            return NS(request_id=rid, num_prompt_tokens=prompt, num_tokens=prompt + outputs,
                      output_token_ids=[0] * outputs, num_computed_tokens=computed, status=RUNNING,
                      sampling_params=NS(extra_args={"stratum": stratum} if stratum else None))

        a = req("a-0123abcd", 10, stratum="science")
        b = req("b-89abcdef", 12, outputs=5)  # preempted: recomputes prompt and outputs
        sched = NS(requests={a.request_id: a, b.request_id: b})

        def schedule(t, tokens):
            for rid, n in tokens.items():
                sched.requests[rid].num_computed_tokens += n
            out = NS(num_scheduled_tokens=tokens)
            obs.on_schedule(sched, out, t)
            return out

        s1 = schedule(1.0, {a.request_id: 10, b.request_id: 8})  # a: whole prompt; b: recompute chunk
        s2 = schedule(2.0, {a.request_id: 1, b.request_id: 8})   # async: before update(s1)
        obs.on_update(s1, 3.0)
        a.num_tokens += 1
        a.output_token_ids.append(1)
        s3 = schedule(3.5, {a.request_id: 1, b.request_id: 1})
        a.status = FINISHED  # a stops (EOS) in update(s2) while s3, which has it, is in flight
        a.output_token_ids.append(2)
        obs.on_update(s2, 4.0)
        b.status = FINISHED  # b is aborted while s3 runs
        obs.on_update(s3, 5.0, idle=True)

        records = []
        while pull.poll(1000):
            msg = transport.decode(pull.recv())
            if isinstance(msg, transport.Steps):
                records += msg.records
            if len(records) == 3:
                break
    finally:
        if obs is not None:
            obs.close()
        ctx.destroy(linger=0)
    assert [r.step for r in records] == [0, 1, 2]
    assert [(r.t_start, r.t_end) for r in records] == [(1.0, 3.0), (3.0, 4.0), (4.0, 5.0)]
    rows = [{e.id: (e.prefill_tokens, e.decode_tokens, e.context_tokens, e.finished) for e in r.requests}
            for r in records]
    A, B = a.request_id, b.request_id  # the engine's own ids (vLLM's random suffix kept)
    assert rows[0] == {A: (10, 0, 0, False), B: (8, 0, 0, False)}
    assert rows[1] == {A: (0, 1, 10, False), B: (8, 0, 8, False)}  # b: outputs recomputed = prefill
    assert rows[2] == {A: (0, 1, 11, True), B: (0, 1, 16, True)}  # finished once, on the last step
    # the engine's output count, on the finished entry only (s3's token for a was discarded by vLLM)
    assert [{e.id: e.output_tokens for e in r.requests} for r in records][2] == {A: 2, B: 5}
    assert all(e.output_tokens is None for r in records[:2] for e in r.requests)
    assert all(e.stratum == ("science" if e.id == A else None) for r in records for e in r.requests)
    assert all(e.prompt_tokens == {A: 10, B: 12}[e.id] for r in records for e in r.requests)
    assert obs.info == {} and obs.pending == {}


def test_hook_stats_summary(tmp_path):
    """WATTPRINT_HOOK_STATS: the timed observer calls keep one sample per emitted step, and the summary
    is written when the scheduler runs out of requests (not before this process has a scheduler)."""
    import json
    from types import SimpleNamespace as NS

    from wattprint.profiler.vllm.observer import StepObserver
    from wattprint.profiler.vllm.stats import HookStats

    obs = StepObserver(DirectSender(f"ipc://{tmp_path}/nobody.sock", hwm=64), finished_above=6)
    stats = HookStats(str(tmp_path / "stats-{pid}.json"), "direct", obs)
    on_schedule, on_update = stats.timed()
    stats.dump()
    assert not list(tmp_path.glob("stats-*.json"))  # no Hello yet: no scheduler in this process
    obs.hello = transport.encode(transport.Hello(pid=1, model="m", model_config={}))
    r = NS(request_id="a", num_prompt_tokens=4, num_tokens=4, output_token_ids=[], num_computed_tokens=0,
           status=5, sampling_params=None)
    sched = NS(requests={"a": r})
    for t, n, idle in ((1.0, 4, False), (2.0, 1, True)):
        r.num_computed_tokens += n
        out = NS(num_scheduled_tokens={"a": n})
        assert on_schedule(sched, out, t) is not None
        if idle:
            r.status, sched.requests = 7, {}
        on_update(out, t + 0.5, idle)
    obs.close()
    summary = json.loads((tmp_path / f"stats-{os.getpid()}.json").read_text())
    assert summary["pid"] == os.getpid() and summary["sender"] == "direct"
    assert summary["steps"] == 2 and summary["requests_per_step_max"] == 1
    assert summary["hook_us_median"] > 0 and summary["hook_cpu_us_mean"] >= 0
    assert summary["errors"] == 0 and summary["dropped_total"] == obs.dropped_total()
    assert obs.info == {} and obs.pending == {}


# -- the real engine -----------------------------------------------------------------------------


class Receiver:
    """The sidecar's side: a PULL socket drained by a thread into a list of decoded messages."""

    def __init__(self, address: str):
        self.address = address
        self.ctx = zmq.Context()
        self.messages: list = []
        self.engine_ids: set[str] = set()  # the ids as the hook sent them
        self.lock = threading.Lock()
        self.sock = None
        self.thread = None
        self.stop = threading.Event()

    def bind(self) -> None:
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.bind(self.address)
        self.stop.clear()
        self.thread = threading.Thread(target=self._run, args=(self.sock,), daemon=True)
        self.thread.start()

    def unbind(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(linger=0)
        self.sock = None
        path = self.address.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)

    def _run(self, sock) -> None:
        while not self.stop.is_set():
            if sock.poll(50):
                msg = transport.decode(sock.recv())
                if isinstance(msg, transport.Steps):
                    # the hook names requests by the engine's own id (vLLM >= 0.11 appends "-<8 hex>" to the
                    # caller's): compare with LLM.generate's request_id without that suffix
                    for r in msg.records:
                        for e in r.requests:
                            self.engine_ids.add(e.id)
                            e.id = strip_random_suffix(e.id)
                with self.lock:
                    self.messages.append(msg)

    def snapshot(self) -> list:
        with self.lock:
            return list(self.messages)

    def records(self) -> list[StepRecord]:
        return [r for m in self.snapshot() if isinstance(m, transport.Steps) for r in m.records]

    def hellos(self) -> list[transport.Hello]:
        return [m for m in self.snapshot() if isinstance(m, transport.Hello)]

    def wait(self, predicate, timeout_s: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    def wait_finished(self, ids, timeout_s: float = 20.0) -> bool:
        ids = set(ids)

        def done():
            return ids <= {e.id for r in self.records() for e in r.requests if e.finished}

        return self.wait(done, timeout_s)

    def close(self) -> None:
        try:
            if self.sock is not None:
                self.unbind()
        finally:
            self.ctx.destroy(linger=0)  # also closes a socket that unbind() left open


@pytest.fixture(scope="module", params=["direct", "thread"])
def engine(tmp_path_factory, request):
    vllm = pytest.importorskip("vllm")
    from wattprint.profiler.twin.tinymodel import write_tiny_model

    tmp = tmp_path_factory.mktemp("vllm_hook")
    model = write_tiny_model(tmp / "tiny", seed=1)
    address = f"ipc://{tmp}/sidecar.sock"
    env = {
        transport.ENV_SIDECAR: address,
        "WATTPRINT_HOOK_SNDHWM": str(SNDHWM),
        "WATTPRINT_HOOK_SENDER": request.param,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    receiver = Receiver(address)
    llm = None
    try:
        # The sidecar is not there yet: the engine must start anyway, its Hello waits in the queue.
        llm = vllm.LLM(
            str(model),
            max_model_len=2048,
            max_num_batched_tokens=MAX_BATCHED,
            enable_chunked_prefill=True,
            max_num_seqs=16,
            gpu_memory_utilization=0.2,
            enforce_eager=True,
            seed=0,
        )
        receiver.bind()
        yield llm, receiver, vllm
    finally:
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort; the finalizer does it otherwise
                pass
            del llm
            gc.collect()
        receiver.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _by_request(records):
    out = defaultdict(list)
    for r in records:
        for e in r.requests:
            out[e.id].append((r, e))
    return out


def _check_steps(records):
    """Steps are numbered upwards and their spans do not overlap."""
    validate_steps(records, "<hook>")
    for prev, cur in zip(records, records[1:]):
        assert cur.step > prev.step
        assert cur.t_start >= prev.t_end
    for r in records:
        assert r.t_end >= r.t_start
        assert sum(e.prefill_tokens + e.decode_tokens for e in r.requests) <= MAX_BATCHED


@pytest.mark.vllm
@pytest.mark.timeout(300)
def test_hello_arrives_after_late_bind(engine):
    llm, rx, vllm = engine
    assert rx.wait(lambda: rx.hellos(), 20), "no Hello"
    hello = rx.hellos()[0]
    assert hello.engine == "vllm" and hello.engine_version == vllm.__version__
    assert hello.model_config["hidden_size"] == 128
    assert hello.model_config["num_attention_heads"] == 2
    assert hello.model_config["model_type"] == "llama"
    assert isinstance(hello.kv_block_size, int) and hello.kv_block_size > 0
    assert hello.tensor_parallel_size == 1
    assert hello.pid != os.getpid()  # sent from the EngineCore process


@pytest.mark.vllm
@pytest.mark.timeout(300)
def test_step_records_match_the_engine(engine):
    llm, rx, vllm = engine
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    words = "energy prefill decode cache token step river house morning science".split()
    long_prompt = " ".join(words[i % 7] + str(i) for i in range(120))  # > MAX_BATCHED tokens
    prompts = [long_prompt] + [f"Question {i}: what is {words[i % 10]} number {i}?" for i in range(7)]
    max_tokens = [5, 1, 2, 9, 17, 4, 12, 30]
    strata = ["science", "science", None, "code", "science", None, "chat", "science"]
    params = [
        SamplingParams(max_tokens=m, ignore_eos=True, extra_args={"stratum": s} if s else None)
        for m, s in zip(max_tokens, strata)
    ]
    t0 = time.monotonic()
    outs = llm.generate(prompts, params, use_tqdm=False)
    t1 = time.monotonic()
    ids = [o.request_id for o in outs]
    assert len(tok(long_prompt)["input_ids"]) > MAX_BATCHED
    assert rx.wait_finished(ids), "not every request got its finished step"

    records = [r for r in rx.records() if any(e.id in ids for e in r.requests)]
    _check_steps(rx.records())
    assert t0 <= records[0].t_start and records[-1].t_end <= t1 + 1e-3  # one clock: time.monotonic
    per_req = _by_request(records)
    for out, m, s in zip(outs, max_tokens, strata):
        rows = per_req[out.request_id]
        assert rows, f"no records for {out.request_id}"
        entries = [e for _, e in rows]
        n_prompt = len(out.prompt_token_ids)
        assert all(e.prompt_tokens == n_prompt for e in entries)
        # Context of the first step (prefix-cache hits) + all prefill tokens = the prompt.
        assert entries[0].context_tokens + sum(e.prefill_tokens for e in entries) == n_prompt
        assert entries[0].context_tokens == 0  # nothing cached for these prompts
        # Every output token but the first comes from a decode step; the first from the last prefill.
        n_out = len(out.outputs[0].token_ids)
        assert n_out == m
        assert sum(e.decode_tokens for e in entries) + 1 == n_out
        # Each step continues where the previous one ended.
        for a, b in zip(entries, entries[1:]):
            assert b.context_tokens == a.context_tokens + a.prefill_tokens + a.decode_tokens
        # Prefill steps first, then decode steps of one token.
        kinds = ["p" if e.prefill_tokens else "d" for e in entries]
        assert "".join(kinds) == "p" * kinds.count("p") + "d" * kinds.count("d")
        assert all(e.decode_tokens in (0, 1) and (e.prefill_tokens == 0) != (e.decode_tokens == 0)
                   for e in entries)
        assert all(e.stratum == s for e in entries)
        # finished exactly once, on the last step of the request.
        assert [e.finished for e in entries] == [False] * (len(entries) - 1) + [True]
        assert entries[-1].output_tokens == n_out  # the engine's count, on the finished entry

    # The long prompt is split into several prefill chunks of at most MAX_BATCHED tokens.
    long_rows = [e for _, e in per_req[outs[0].request_id] if e.prefill_tokens]
    n_long = len(outs[0].prompt_token_ids)
    assert len(long_rows) >= math.ceil(n_long / MAX_BATCHED) >= 2
    assert all(e.prefill_tokens <= MAX_BATCHED for e in long_rows)
    # Dropped nothing while the sidecar was there.
    assert all(m.dropped_total == 0 for m in rx.snapshot() if isinstance(m, transport.Steps))


@pytest.mark.vllm
@pytest.mark.timeout(300)
def test_prefix_cache_hit_shows_as_context(engine):
    llm, rx, vllm = engine
    from vllm import SamplingParams

    if not llm.llm_engine.vllm_config.cache_config.enable_prefix_caching:
        pytest.skip("prefix caching is off")
    block = llm.llm_engine.vllm_config.cache_config.block_size
    prompt = " ".join(f"shared{i}" for i in range(block + 40))
    sp = SamplingParams(max_tokens=2, ignore_eos=True)
    first = llm.generate([prompt], sp, use_tqdm=False)[0]
    second = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert rx.wait_finished([first.request_id, second.request_id])
    per_req = _by_request(rx.records())
    n_prompt = len(second.prompt_token_ids)
    assert n_prompt > block
    a = [e for _, e in per_req[first.request_id]]
    b = [e for _, e in per_req[second.request_id]]
    assert a[0].context_tokens == 0 and sum(e.prefill_tokens for e in a) == n_prompt
    assert b[0].context_tokens >= block  # the cached blocks are context, not prefill
    assert b[0].context_tokens + sum(e.prefill_tokens for e in b) == n_prompt


@pytest.mark.vllm
@pytest.mark.timeout(300)
def test_chat_template_and_request_ids(engine):
    llm, rx, vllm = engine
    from vllm import SamplingParams

    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3
    assert rx.wait_finished([out.request_id])
    # The hook sends the engine's own ids (no client controls them): the caller's id plus vLLM's random
    # suffix; without the suffix they are the ids vLLM gives back to its caller.
    assert any(strip_random_suffix(i) != i and strip_random_suffix(i) == out.request_id for i in rx.engine_ids)
    seen = {e.id for r in rx.records() for e in r.requests}
    assert out.request_id in seen
    assert all("-" not in i for i in seen)  # LLM ids are counters; internal ids are "<id>-<8 hex>"


@pytest.mark.vllm
@pytest.mark.timeout(300)
def test_no_sidecar_no_hang_then_recovers(engine):
    llm, rx, vllm = engine
    from vllm import SamplingParams

    rx.unbind()  # the sidecar goes away
    before = rx.snapshot()
    last_step = max(r.step for r in rx.records())
    dropped_before = [m for m in before if isinstance(m, transport.Steps)][-1].dropped_total
    n_before = len(rx.records())
    sp = SamplingParams(max_tokens=3 * SNDHWM, ignore_eos=True)
    t0 = time.monotonic()
    outs = llm.generate(["nobody is listening", "still nobody"], sp, use_tqdm=False)
    assert time.monotonic() - t0 < 60, "the engine waited for the sidecar"
    assert all(len(o.outputs[0].token_ids) == 3 * SNDHWM for o in outs)

    hellos_before = len(rx.hellos())
    rx.bind()  # the sidecar is back: ZeroMQ reconnects, queued records then new ones arrive
    time.sleep(0.7)  # > the hook's reconnect poll period, so that it sends its Hello again
    after = llm.generate(["hello again"] * 2, SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    after_ids = {o.request_id for o in after}
    assert rx.wait_finished(after_ids)
    steps_msgs = [m for m in rx.snapshot() if isinstance(m, transport.Steps)]
    dropped = steps_msgs[-1].dropped_total - dropped_before
    assert dropped > 0, "drops were not counted"
    # Every step of the gap was either queued (and delivered now) or dropped and counted.
    first_after = min(r.step for r in rx.records() if any(e.id in after_ids for e in r.requests))
    n_gap = first_after - last_step - 1
    assert n_gap >= 3 * SNDHWM
    got = [r for r in rx.records()[n_before:] if last_step < r.step < first_after]
    assert got, "records queued while nobody listened did not arrive"
    print(f"[{os.environ['WATTPRINT_HOOK_SENDER']}] gap {n_gap} steps: {len(got)} delivered late, {dropped} dropped")
    assert len(got) + dropped == n_gap
    assert rx.wait(lambda: len(rx.hellos()) > hellos_before, 10), "no Hello after the reconnect"
    _check_steps(rx.records())
