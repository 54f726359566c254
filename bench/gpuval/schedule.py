"""Deterministic continuous-batching schedules, and the isolation replays cut from them.

A workload is a list of requests (prompt length, output length) served by ``concurrency`` clients in a
closed loop: a request arrives as soon as a slot is free and leaves after its last decode token, so the
batch changes all the time. With ``wave_steps``, requests arrive only in alternate windows of that
many steps (traffic in waves): counter intervals then see different mixes of prefill and decode, which
is what lets wattprint's fit tell the phases' costs apart (with a perfectly steady mix it leans on the
calibrated prior). The scheduler is a pure function of the workload (no wall clock), so the
same schedule can be replayed:

* ``interleave``: every step is phase-pure, either prefill chunks (up to the token budget) or one
  decode token for every running request; a prefill step follows every ``decode_per_prefill`` decode
  steps while prompts wait (vLLM without mixed batches). Steps of 5-50 ms against a counter republished
  every ~100 ms: every counter interval holds both phases.
* ``chunked``: vLLM V1's chunked prefill: each step decodes every running request and fills the rest of
  the token budget with prompt chunks, so prefill and decode share steps.

:func:`only` keeps the prefill or the decode entries of each step: the **isolation** replay of the same
work. In an ``interleave`` schedule each isolated step is exactly a step of the mixed run, so the
isolated runs give each phase's true energy in the mixed run (up to the GPU's own run-to-run variation).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from gpuval.engine import Entry

POLICIES = ("interleave", "chunked")


@dataclass(frozen=True)
class Workload:
    requests: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]  # decode tokens per request (the first output token comes with the prompt)
    concurrency: int
    chunk: int  # largest prompt chunk per request and step
    policy: str = "interleave"
    decode_per_prefill: int = 1
    seed: int = 0
    wave_steps: int = 0  # >0: requests arrive only in the first half of every 2*wave_steps steps

    @property
    def token_budget(self) -> int:
        return self.chunk + self.concurrency

    @property
    def max_ctx(self) -> int:
        return self.prompt_range[1] + self.output_range[1] + 1


@dataclass
class _Req:
    rid: str
    slot: int
    prompt: int
    output: int
    done_prompt: int = 0
    decoded: int = 0


def build(w: Workload) -> list[list[Entry]]:
    """The steps of workload ``w`` under its policy."""
    if w.policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}")
    rng = np.random.default_rng(w.seed)
    prompts = rng.integers(w.prompt_range[0], w.prompt_range[1] + 1, w.requests)
    outputs = rng.integers(w.output_range[0], w.output_range[1] + 1, w.requests)
    free = deque(range(w.concurrency))
    waiting: deque[_Req] = deque()  # admitted, prompt not finished (FIFO)
    running: list[_Req] = []  # decoding
    steps: list[list[Entry]] = []
    nxt, since_prefill = 0, 0
    while nxt < w.requests or waiting or running:
        arriving = not w.wave_steps or len(steps) % (2 * w.wave_steps) < w.wave_steps or not (waiting or running)
        while arriving and free and nxt < w.requests:  # closed loop: a client sends its next request at once
            waiting.append(_Req(f"r{nxt}", free.popleft(), int(prompts[nxt]), int(outputs[nxt])))
            nxt += 1
        if w.policy == "chunked":
            dec = _decodes(running, free)
            entries = dec + _chunks(waiting, running, w.token_budget - len(dec), w.chunk)
        elif waiting and (not running or since_prefill >= w.decode_per_prefill):
            entries, since_prefill = _chunks(waiting, running, w.token_budget, w.chunk), 0
        else:
            entries, since_prefill = _decodes(running, free), since_prefill + 1
        steps.append(entries)
    return steps


def _chunks(waiting: deque[_Req], running: list[_Req], budget: int, chunk: int) -> list[Entry]:
    out = []
    for r in list(waiting):
        if budget <= 0:
            break
        t = min(chunk, r.prompt - r.done_prompt, budget)
        out.append(Entry(r.rid, r.slot, t, r.done_prompt, True, r.prompt))
        r.done_prompt += t
        budget -= t
        if r.done_prompt == r.prompt:  # first output token sampled: the request decodes from the next step
            waiting.remove(r)
            running.append(r)
    return out


def _decodes(running: list[_Req], free: deque[int]) -> list[Entry]:
    out = []
    for r in list(running):
        r.decoded += 1
        last = r.decoded == r.output
        out.append(Entry(r.rid, r.slot, 1, r.prompt + r.decoded - 1, False, r.prompt, last))
        if last:
            running.remove(r)
            free.append(r.slot)
    return sorted(out, key=lambda e: e.slot)


def only(steps: list[list[Entry]], prefill: bool) -> list[list[Entry]]:
    """The isolation replay: each step's prefill (or decode) entries alone, empty steps dropped."""
    out = [[e for e in s if e.prefill == prefill] for s in steps]
    return [s for s in out if s]


def decode_block(steps: int, contexts: list[int], ids: list[str]) -> list[list[Entry]]:
    """``steps`` decode steps of one request per context in slots 0.., request i starting at ``contexts[i]``."""
    return [[Entry(ids[i], i, 1, c + j, False, c, j == steps - 1) for i, c in enumerate(contexts)]
            for j in range(steps)]


def tokens(steps: list[list[Entry]], prefill: bool) -> int:
    return sum(e.tokens for s in steps for e in s if e.prefill == prefill)


def kv_blocks(batch: int, steps: int, contexts: tuple[int, int]) -> dict[str, list[list[Entry]]]:
    """Decode-only runs at ``batch``: every request at the short context, every one at the long one, and
    half and half (ids start with S or L)."""
    c0, c1 = contexts
    mixed = [c1 if i % 2 == 0 else c0 for i in range(batch)]
    return {"short": decode_block(steps, [c0] * batch, [f"S{i}" for i in range(batch)]),
            "long": decode_block(steps, [c1] * batch, [f"L{i}" for i in range(batch)]),
            "mixed": decode_block(steps, mixed, [("L" if c == c1 else "S") + str(i) for i, c in enumerate(mixed)])}
