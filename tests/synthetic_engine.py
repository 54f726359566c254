"""A synthetic engine for tests: feeds a sidecar Hello and step records over its ZeroMQ socket."""

from __future__ import annotations

import os
import time
import uuid

from wattprint.profiler.core.records import RequestEntry, StepRecord
from wattprint.profiler.transport import messages as transport

LLAMA = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
         "num_key_value_heads": 2, "intermediate_size": 1024, "vocab_size": 32000, "torch_dtype": "bfloat16"}
STRATA = ("science", "critical", "agentic", "not-a-stratum")


def feed_steps(push, should_stop, finished_ids: list, step_s: float = 0.02) -> None:
    """Hello, then engine steps with two requests in flight: a prefill step, then decode steps, then finish."""
    push.send(transport.encode(transport.Hello(pid=os.getpid(), model="tiny-llama", model_config=LLAMA)))
    live: list[list] = []  # [id, stratum, steps done, length]
    n = step = 0
    while not should_stop():
        while len(live) < 2:
            live.append([f"req-{uuid.uuid4().hex[:16]}", STRATA[n % len(STRATA)], 0, 6 + 3 * (n % 3)])
            n += 1
        t0 = time.monotonic()
        time.sleep(step_s)
        t1 = time.monotonic()
        entries = []
        for r in live:
            rid, stratum, done, length = r
            prefill = done == 0
            entries.append(RequestEntry(rid, 32 if prefill else 0, 0 if prefill else 1, 0 if prefill else 31 + done,
                                        stratum=stratum, prompt_tokens=32, finished=done + 1 >= length))
            r[2] += 1
        push.send(transport.encode(transport.Steps(pid=os.getpid(), records=[
            StepRecord(step=step, t_start=t0, t_end=t1, requests=entries)])))
        step += 1
        finished_ids.extend(r[0] for r in live if r[2] >= r[3])
        live = [r for r in live if r[2] < r[3]]
