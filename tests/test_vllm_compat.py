"""The step hook on vLLM's real ``Scheduler`` and ``AsyncScheduler`` (no engine process, no weights).

The installed vLLM's schedulers are built the way vLLM's own scheduler tests build them (a model config
read from a local ``config.json``, a KV-cache config with a given number of blocks), the hook is patched
onto them, and a small driver plays the engine core: ``step()`` (schedule, run, update) for the
synchronous scheduler, ``step_with_batch_queue()`` (step N+1 scheduled before ``update_from_output`` of
step N) for the asynchronous one, with a fake model runner that samples a token for every request whose
step completes its known tokens. The hook's records are checked against what the scheduler did:
steps never overlap, every scheduled token is recorded once in its step, contexts are the positions the
model runner is told, the first context is the engine's prefix-cache hit, recomputation after a
preemption is prefill, and a finished request's output count is what the scheduler emitted.
"""

from __future__ import annotations

import itertools
from collections import defaultdict, deque
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from wattprint.profiler.core.records import validate_steps  # noqa: E402
from wattprint.profiler.transport import messages  # noqa: E402
from wattprint.profiler.vllm import hook  # noqa: E402
from wattprint.profiler.vllm.observer import StepObserver  # noqa: E402

BLOCK = 16
STOP = 7  # the stop token id the fake model samples when a request is told to stop
MODES = ["sync", "async"]


class Clock:
    """``time.monotonic`` for the hook: every call is one second later (steps of async scheduling
    then really start before the previous one ends)."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


class WireRecorder:
    """Stands in for the hook's sender: each record goes through the wire encoding at once."""

    def __init__(self):
        self.records, self.hellos, self.on_error = [], [], None

    def send_hello(self, data: bytes) -> None:
        self.hellos.append(messages.decode(data))

    def send(self, record, now: float, idle: bool) -> None:
        self.records += messages.decode(messages.encode(messages.Steps(1, [record], 0))).records

    def tick(self, now: float) -> None:
        pass

    def close(self, timeout_s: float = 0.3) -> None:
        pass

    def lost(self, n: int = 1) -> None:
        raise AssertionError("the hook lost a step")

    def dropped_total(self) -> int:
        return 0


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    from wattprint.profiler.twin.tinymodel import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("compat") / "tiny", seed=2))


@pytest.fixture
def patched(monkeypatch):
    """Restores vLLM's Scheduler class (and the hook's clock) after the test."""
    from vllm.v1.core.sched.scheduler import Scheduler

    for name in ("__init__", "schedule", "update_from_output", "shutdown"):
        monkeypatch.setattr(Scheduler, name, Scheduler.__dict__[name])
    monkeypatch.setattr(Scheduler, "_wattprint_hooked", False, raising=False)
    monkeypatch.setattr(hook, "time", SimpleNamespace(monotonic=Clock()))
    monkeypatch.setattr(hook, "_observer", None)
    return Scheduler


@pytest.fixture
def recorder(patched):
    cls, finished_above = hook._check_layout()
    rec = WireRecorder()
    hook._patch(cls, StepObserver(rec, finished_above=finished_above), None)
    return rec


def make_scheduler(model: str, mode: str, *, num_blocks: int = 200, max_batched: int = 64, max_seqs: int = 8,
                   long_prefill: int = 0):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    max_len = 2048
    config = VllmConfig(
        model_config=ModelConfig(model=model, dtype="float32", seed=0, skip_tokenizer_init=True,
                                 max_model_len=max_len),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
        scheduler_config=SchedulerConfig(max_model_len=max_len, is_encoder_decoder=False,
                                         max_num_batched_tokens=max_batched, max_num_seqs=max_seqs,
                                         long_prefill_token_threshold=long_prefill, enable_chunked_prefill=True),
    )
    config.scheduler_config.async_scheduling = mode == "async"  # the CPU platform turns it off
    config.cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(BLOCK, num_kv_heads=1, head_size=8, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    cls = AsyncScheduler if mode == "async" else Scheduler
    return cls(vllm_config=config, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(config),
               block_size=BLOCK, log_stats=True)


class Engine:
    """Drives a scheduler as vLLM's ``EngineCore`` does, with a fake model runner."""

    def __init__(self, scheduler, mode: str):
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

        hash_fn = get_hash_fn_by_name("sha256")
        init_none_hash(hash_fn)
        self.hasher = get_request_block_hasher(BLOCK, hash_fn)
        self.s = scheduler
        self.depth = 2 if mode == "async" else 1  # the batch queue's size
        self.queue: deque = deque()
        self.requests = {}  # every request added, by id
        self.stop_after: dict[str, int] = {}  # request id -> output index at which STOP is sampled
        self.aborts: list[str] = []  # aborted while a step runs (EngineCore's aborts queue)
        self.steps: list[dict] = []  # per non-empty step, in update order: what the scheduler did
        self.emitted: dict[str, int] = defaultdict(int)  # tokens in the scheduler's outputs
        self.finished: set[str] = set()
        self.cached: dict[str, int] = {}  # the engine's prefix-cache hit (PrefillStats)
        self.preempted: set[str] = set()

    def add(self, rid: str, prompt: list[int], max_tokens: int, stop_after: int | None = None) -> None:
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        params = SamplingParams(max_tokens=max_tokens, stop_token_ids=[STOP])
        req = self.requests[rid] = Request(rid, list(prompt), params, None, block_hasher=self.hasher)
        if stop_after is not None:
            self.stop_after[rid] = stop_after
        self.s.add_request(req)

    def abort_now(self, *ids: str) -> None:
        from vllm.v1.request import RequestStatus

        self.s.finish_requests(list(ids), RequestStatus.FINISHED_ABORTED)

    def _run(self, out):
        """What the model runner does with a step: positions and the tokens it samples."""
        from vllm.v1.outputs import ModelRunnerOutput

        data = out.scheduled_cached_reqs
        start = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        start.update(zip(data.req_ids, data.num_computed_tokens))
        self.preempted |= set(out.preempted_req_ids or ())
        ids, sampled, info = list(out.num_scheduled_tokens), [], {}
        for rid in ids:
            r = self.s.requests[rid]
            index = r.num_output_tokens + max(r.num_output_placeholders - 1, 0)
            sampling = not r.is_prefill_chunk
            token = STOP if index >= self.stop_after.get(rid, 1 << 30) else 100 + index % 50
            sampled.append([token] if sampling else [])
            info[rid] = (out.num_scheduled_tokens[rid], start[rid], r.num_tokens, sampling)
        return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                 sampled_token_ids=sampled), info

    def _update(self, out, result, info) -> None:
        if self.aborts:
            self.abort_now(*self.aborts)
            self.aborts = []
        gone = {rid for rid in info if rid not in self.s.requests or self.s.requests[rid].is_finished()}
        if info:
            self.steps.append({"tokens": info, "wasted": gone})
        for eco in self.s.update_from_output(out, result).values():
            for o in eco.outputs:
                self.emitted[o.request_id] += len(o.new_token_ids)
                if o.finish_reason is not None:
                    self.finished.add(o.request_id)
                if o.prefill_stats is not None:
                    self.cached[o.request_id] = o.prefill_stats.num_cached_tokens
        self.finished |= {rid for rid in gone if rid in info}

    def step(self) -> bool:
        """One ``EngineCore.step`` / ``step_with_batch_queue``; False when there is nothing left."""
        s, queue = self.s, self.queue
        if s.has_requests():
            out = s.schedule()
            result, info = self._run(out)
            queue.appendleft((out, result, info))
            if len(queue) < self.depth and (out.total_num_scheduled_tokens > 0 or s.has_requests()):
                return True
        elif not queue:
            return False
        self._update(*queue.pop())
        return True

    def run(self, max_steps: int = 5000, until=None) -> None:
        for _ in range(max_steps):
            if (until is not None and until()) or not self.step():
                return
        raise AssertionError("the scheduler did not drain")


def by_request(records):
    out = defaultdict(list)
    for i, r in enumerate(records):
        for e in r.requests:
            out[e.id].append((i, e))
    return out


def check(records, eng: Engine) -> dict:
    """The hook's records against what the scheduler did (see the module docstring). Returns the
    records' entries by request id (the engine's own ids, vLLM's random suffix kept)."""
    validate_steps(records, "<hook>")
    for a, b in itertools.pairwise(records):
        assert a.t_end <= b.t_start < b.t_end, "steps overlap"
    assert [r.step for r in records] == list(range(len(records)))
    assert len(records) == len(eng.steps), "a step was lost or recorded twice"
    for rec, did in zip(records, eng.steps):
        assert {e.id: e.prefill_tokens + e.decode_tokens for e in rec.requests} == {
            rid: v[0] for rid, v in did["tokens"].items()}
        for e in rec.requests:
            n, start, known, sampling = did["tokens"][e.id]
            assert e.context_tokens == start  # the position the model runner is told
            assert e.prompt_tokens == len(eng.requests[e.id].prompt_token_ids)
            if e.prefill_tokens:  # only tokens the request already has: its prompt, or recompute
                assert start + n <= max(known, e.prompt_tokens)
            else:
                assert start >= known - 1 and sampling
    entries = by_request(records)
    assert set(entries) == set(eng.requests)
    for rid, rows in entries.items():
        es = [e for _, e in rows]
        assert es[0].context_tokens == eng.cached[rid], rid  # the engine's prefix-cache hit
        flags = [e.finished for e in es]
        if rid in eng.finished:
            assert flags == [False] * (len(es) - 1) + [True], rid
            assert es[-1].output_tokens == eng.emitted[rid] == len(eng.requests[rid].output_token_ids), rid
        else:
            assert not any(flags), rid
        assert all(e.output_tokens is None for e in es[:-1])
        live = [(i, e) for i, e in rows if rid not in eng.steps[i]["wasted"]]
        decode = sum(e.decode_tokens for _, e in live)
        sampled_prefill = sum(1 for i, e in live if e.prefill_tokens and eng.steps[i]["tokens"][rid][3])
        assert decode + sampled_prefill == eng.emitted[rid], rid  # every output once; recompute is no output
        if rid not in eng.preempted:
            assert es[0].context_tokens + sum(e.prefill_tokens for e in es) == es[0].prompt_tokens, rid
            assert sampled_prefill == (1 if eng.emitted[rid] else 0), rid
    return entries


def prompt(seed: int, n: int) -> list[int]:
    return [1000 + (seed * 7919 + i * 31) % 20000 for i in range(n)]


@pytest.mark.parametrize("mode", MODES)
def test_chunked_prefill_decode_and_prefix_hits(tiny_config, recorder, mode):
    eng = Engine(make_scheduler(tiny_config, mode), mode)
    shared = prompt(1, 6 * BLOCK)
    eng.add("long", shared + prompt(2, 150), max_tokens=12)  # several prefill chunks of <= 64
    eng.add("short", prompt(3, 9), max_tokens=5, stop_after=3)  # stops on its 4th token
    eng.run(until=lambda: len(eng.steps) >= 3)
    eng.add("hit", shared + prompt(4, 20), max_tokens=6)  # the shared blocks are cached by now
    eng.add("same", shared + prompt(2, 150), max_tokens=3)
    eng.add("one", prompt(5, 3), max_tokens=1)
    eng.run()
    assert eng.s.get_num_unfinished_requests() == 0
    assert recorder.hellos and recorder.hellos[0].model_config["model_type"] == "llama"
    entries = check(recorder.records, eng)
    pairs = list(itertools.pairwise(recorder.records))
    if mode == "async":  # step N+1 was scheduled before step N ended: it starts where step N ends
        assert sum(a.t_end == b.t_start for a, b in pairs) > len(pairs) // 2
        assert any(s["wasted"] for s in eng.steps)  # "short" stopped while its next step ran
    else:
        assert all(a.t_end < b.t_start for a, b in pairs)
    assert eng.emitted["short"] == 4 and eng.emitted["long"] == 12 and eng.emitted["one"] == 1
    assert entries["hit"][0][1].context_tokens == 6 * BLOCK == eng.cached["hit"]
    assert entries["same"][0][1].context_tokens >= 6 * BLOCK
    assert len([e for _, e in entries["long"] if e.prefill_tokens]) >= 4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [0, 1])  # 1: recompute in one-token chunks
def test_preemption_recompute_is_prefill(tiny_config, recorder, mode, chunk):
    eng = Engine(make_scheduler(tiny_config, mode, num_blocks=14, long_prefill=chunk), mode)
    for i in range(4):
        eng.add(f"r{i}", prompt(10 + i, 30 + 5 * i), max_tokens=40)
    eng.run()
    assert eng.preempted, "no preemption: the KV cache is too large for this test"
    entries = check(recorder.records, eng)
    for rid in eng.preempted:
        es = [e for _, e in entries[rid]]
        assert sum(e.prefill_tokens for e in es) > es[0].prompt_tokens - es[0].context_tokens
        assert es[-1].finished and es[-1].output_tokens == 40


@pytest.mark.parametrize("mode", MODES)
def test_aborts(tiny_config, recorder, mode):
    eng = Engine(make_scheduler(tiny_config, mode), mode)
    for i in range(4):
        eng.add(f"a{i}", prompt(20 + i, 40), max_tokens=30)
    eng.run(until=lambda: len(eng.steps) >= 4)
    eng.aborts = ["a0"]  # arrives while a step that has it runs: processed before its update
    eng.step()
    eng.step()
    eng.abort_now("a1")  # between steps
    eng.run()
    entries = check(recorder.records, eng)
    a0 = [e for _, e in entries["a0"]]
    assert a0[-1].finished and 0 < a0[-1].output_tokens < 30
    if "a1" not in eng.finished:  # no step in flight had it: no finished entry can be sent
        assert not any(e.finished for _, e in entries["a1"])
    assert all(eng.emitted[f"a{i}"] == 30 for i in (2, 3))


def test_install_drives_async_scheduler_over_the_wire(tiny_config, patched, tmp_path):
    """``hook.install`` (what the vLLM plugin calls) with the real sender on an ipc socket."""
    import zmq

    address = f"ipc://{tmp_path}/hook.sock"
    ctx = zmq.Context()
    try:
        pull = ctx.socket(zmq.PULL)
        pull.bind(address)
        assert hook.install(address)
        eng = Engine(make_scheduler(tiny_config, "async"), "async")
        eng.add("x-0123abcd", prompt(30, 70), max_tokens=8)  # vLLM's internal ids: kept as they are
        eng.add("y-89abcdef", prompt(31, 20), max_tokens=5, stop_after=2)
        eng.run()
        hook.observer().close(1.0)
        got = []
        while pull.poll(2000):
            got.append(messages.decode(pull.recv()))
            if sum(len(m.records) for m in got if isinstance(m, messages.Steps)) == len(eng.steps):
                break
    finally:
        ctx.destroy(linger=0)
    hello = next(m for m in got if isinstance(m, messages.Hello))
    assert hello.engine == "vllm" and hello.kv_block_size == BLOCK
    records = [r for m in got if isinstance(m, messages.Steps) for r in m.records]
    assert set(check(records, eng)) == {"x-0123abcd", "y-89abcdef"}
