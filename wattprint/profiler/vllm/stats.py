"""The hook's own cost, kept only when ``WATTPRINT_HOOK_STATS`` is set.

:meth:`HookStats.timed` wraps the observer's two per-step calls so that the hook's code is timed per
step (wall: ``perf_counter_ns``, CPU of the engine thread: ``thread_time_ns``); a JSON summary is
written to the path every ~``PERIOD_S`` seconds, whenever the scheduler runs out of requests, and at
shutdown (``{pid}`` in the path is replaced by the process id). ``bench/bench_hook_overhead.py`` reads it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from array import array

from wattprint.files import atomic_write

PERIOD_S = 2.0  # write the summary at most this often while the engine is busy
_MAX_STEPS = 5_000_000  # steps kept (3 x 8 bytes each)


class HookStats:
    """Per-step time of the hook's code (ns) and the summary file."""

    def __init__(self, path: str, sender_kind: str, observer):
        self.path = path
        self.sender_kind = sender_kind
        self.observer = observer  # a StepObserver: its Hello, errors and drop count go in the summary
        self.ns = array("q")  # wall time (perf_counter_ns) of our code per step
        self.cpu_ns = array("q")  # CPU time of the engine thread in our code (thread_time_ns)
        self.nreq = array("q")
        self.next_dump = time.monotonic() + PERIOD_S

    def timed(self):
        """``(on_schedule, on_update)``: the observer's calls, timed. The time spent in
        ``on_schedule`` rides in the step's pending item to ``on_update``, which records the step."""
        on_schedule, on_update = self.observer.on_schedule, self.observer.on_update
        clock_ns, cpu_ns = time.perf_counter_ns, time.thread_time_ns

        def timed_schedule(scheduler, scheduler_output, t_schedule: float):
            s, c = clock_ns(), cpu_ns()
            item = on_schedule(scheduler, scheduler_output, t_schedule)
            if item is not None:
                item[4] = (clock_ns() - s, cpu_ns() - c)
            return item

        def timed_update(scheduler_output, t_end: float, idle: bool = False):
            s, c = clock_ns(), cpu_ns()
            nreq = len(scheduler_output.num_scheduled_tokens)
            sched = on_update(scheduler_output, t_end, idle)
            if sched:
                d_cpu = cpu_ns() - c
                self.add(sched[0] + clock_ns() - s, sched[1] + d_cpu, nreq, t_end)
            if idle:  # a good moment to write the summary
                self.dump()
            return sched

        return timed_schedule, timed_update

    def add(self, ns: int, cpu_ns: int, nreq: int, now: float) -> None:
        if len(self.ns) < _MAX_STEPS:
            self.ns.append(ns)
            self.cpu_ns.append(cpu_ns)
            self.nreq.append(nreq)
        if now >= self.next_dump:
            self.next_dump = now + PERIOD_S
            self.dump()

    def summary(self) -> dict:
        ns = sorted(self.ns)
        n = len(ns)
        q = (lambda p: ns[min(n - 1, int(p * n))] / 1000) if n else (lambda p: None)
        obs = self.observer
        return {
            "pid": os.getpid(),
            "sender": self.sender_kind,
            "steps": n,
            "hook_us_median": statistics.median(ns) / 1000 if n else None,
            "hook_us_p90": q(0.90),
            "hook_us_p99": q(0.99),
            "hook_us_mean": sum(ns) / n / 1000 if n else None,
            "hook_us_max": ns[-1] / 1000 if n else None,
            "hook_cpu_us_median": statistics.median(self.cpu_ns) / 1000 if n else None,
            "hook_cpu_us_mean": sum(self.cpu_ns) / n / 1000 if n else None,
            "requests_per_step_median": statistics.median(self.nreq) if n else None,
            "requests_per_step_max": max(self.nreq) if n else None,
            "dropped_total": obs.dropped_total(),
            "errors": obs.errors,
        }

    def dump(self) -> None:
        if self.observer.hello is None:
            return  # no scheduler in this process (API server, worker): nothing to tell
        try:
            path = self.path.replace("{pid}", str(os.getpid()))
            atomic_write(path, json.dumps(self.summary(), indent=2).encode("utf-8"))
        except Exception:  # noqa: BLE001 - statistics must never hurt the engine
            pass
