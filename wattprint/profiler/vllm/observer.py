"""Scheduler calls -> one :class:`~wattprint.profiler.core.records.StepRecord` per vLLM engine step.

The hook (:mod:`wattprint.profiler.vllm.hook`) calls :class:`StepObserver` from vLLM's ``Scheduler``:

* after ``Scheduler.schedule`` (:meth:`StepObserver.on_schedule`, with the ``time.monotonic()`` taken
  before vLLM's own): it reads ``SchedulerOutput.num_scheduled_tokens`` (internal request id -> tokens
  this step) and, per request, ``Request.num_computed_tokens`` (already advanced by the scheduler, so
  the context before the step is ``num_computed_tokens - scheduled``), ``num_prompt_tokens``,
  ``num_tokens`` and ``sampling_params.extra_args['stratum']``;
* after ``Scheduler.update_from_output`` (:meth:`StepObserver.on_update`, with ``time.monotonic()``
  taken after vLLM's own): it reads ``Request.status`` (finished and aborted requests) and, for a
  request that finished, ``len(Request.output_token_ids)`` (the tokens the engine generated for it), then
  emits the step.

A step spans from its ``schedule()`` to its ``update_from_output()``. With async scheduling (a batch
queue) the next ``schedule()`` runs before the previous ``update_from_output()``; the step then starts
at the previous step's end, so that steps never overlap, and a request is flagged finished on the last
step that has it. Steps where nothing was scheduled are not emitted.

Tokens of a request in a step are prefill tokens while the request is catching up with tokens it
already has (its prompt, or after a preemption its prompt and outputs: recompute counts as prefill,
however small the chunk), and decode tokens otherwise (speculative draft tokens included). The context
of a request's first entry is what the prefix cache (or a KV connector) supplied: vLLM sets
``num_computed_tokens`` to the hit before the step. A request's last entry is flagged ``finished`` and
carries ``output_tokens``, the engine's own count (tokens of steps still in flight when it stopped, which
vLLM discards, are not in it). Request ids are the engine's own ids (with vLLM's random suffix: two
requests sent with one ``X-Request-Id`` stay two records; the sidecar maps them back to the response id,
:mod:`wattprint.profiler.vllm.ids`). A request's first entry carries the reference the HTTP middleware
gave it (``extra_args['wattprint_ref']``, :class:`~wattprint.profiler.transport.messages.WireEntry`).

A request aborted between steps (not in a step in flight) gets no finished entry: no later step has it,
and an entry without tokens is not a valid record; consumers settle it when it goes stale.

The observer never raises into vLLM (the hook catches and calls :meth:`StepObserver.error`): the first
error is logged (one warning) and the step is skipped; after ``MAX_ERRORS`` errors the observer switches
itself off. Records go to a :mod:`~wattprint.profiler.transport.sender`, which never blocks.
"""

from __future__ import annotations

import logging
import operator
import os

from wattprint.profiler.core.records import RequestEntry, StepRecord
from wattprint.profiler.transport import messages
from wattprint.profiler.transport.messages import WireEntry
from wattprint.profiler.transport.sender import Sender
from wattprint.profiler.vllm.hello import make_hello

logger = logging.getLogger("vllm.wattprint")

MAX_PENDING = 16  # scheduled steps awaiting update_from_output (vLLM keeps <= pipeline depth)
MAX_ERRORS = 10
_get_status = operator.attrgetter("status")


class StepObserver:
    """Turns scheduler calls into StepRecords and hands them to a sender (see the module docstring)."""

    def __init__(self, sender: Sender, *, finished_above: int):
        self.sender = sender
        sender.on_error = self.error
        self.fin = int(finished_above)  # RequestStatus values above this are finished
        self.enabled = True
        self.errors = 0
        self.step = 0
        self.prev_end = 0.0
        # id(SchedulerOutput) -> [num_scheduled_tokens, t_schedule, entries, requests, caller's slot]
        # (the slot carries the hook's self-timing of schedule() to update_from_output())
        self.pending: dict[int, list] = {}
        self.info: dict[str, tuple] = {}  # internal request id -> (external id, stratum)
        self.sweep_at = 4096
        self.hello: bytes | None = None  # this process's encoded Hello, once sent

    # -- lifecycle ---------------------------------------------------------------------------

    def after_fork_in_child(self) -> None:
        self.sender.after_fork_in_child()
        self.pending.clear()
        self.hello = None

    def start(self, scheduler) -> None:
        """Send the Hello (once; the sender sends it again after reconnects)."""
        if self.hello is not None:
            return
        self.hello = messages.encode(make_hello(scheduler, os.getpid()))
        self.sender.send_hello(self.hello)

    def error(self, exc: BaseException, scheduler_output=None) -> None:
        self.errors += 1
        if scheduler_output is not None:
            self.pending.pop(id(scheduler_output), None)
        if self.errors == 1:
            logger.warning("wattprint: step hook error, step skipped (%s: %s)", type(exc).__name__, exc,
                           exc_info=exc)
        if self.errors >= MAX_ERRORS and self.enabled:
            self.enabled = False
            logger.warning("wattprint: step hook switched off after %d errors", self.errors)

    def close(self, timeout_s: float = 0.3) -> None:
        """At engine shutdown: stop observing, let the sender send what is queued (bounded wait) and
        close its socket, so that the process exits promptly."""
        self.enabled = False
        self.sender.close(timeout_s)

    def dropped_total(self) -> int:
        return self.sender.dropped_total()

    # -- per step ----------------------------------------------------------------------------

    def _new_info(self, rid: str, request) -> tuple:
        stratum = ref = None
        sp = getattr(request, "sampling_params", None)
        extra = getattr(sp, "extra_args", None) if sp is not None else None
        if extra:
            s = extra.get("stratum")
            if s is not None:
                stratum = str(s)
            ref = extra.get("wattprint_ref")
            ref = str(ref) if ref is not None else None
        inf = self.info[rid] = (rid, stratum, ref)  # the engine's own id: no client controls it
        return inf

    def on_schedule(self, scheduler, scheduler_output, t_schedule: float):
        """After ``Scheduler.schedule``: snapshot what each request does in this step."""
        if self.hello is None:
            self.start(scheduler)
        nst = scheduler_output.num_scheduled_tokens
        if not nst:
            self.sender.tick(t_schedule)
            return None
        requests = scheduler.requests
        info = self.info
        if len(info) > self.sweep_at:
            self._sweep(requests)
        reqs = list(map(requests.__getitem__, nst))
        entries = []
        add_entry = entries.append
        for (rid, n), r in zip(nst.items(), reqs):
            inf = info.get(rid)
            ref = None
            if inf is None:
                inf = self._new_info(rid, r)
                ref = inf[2]
            before = r.num_computed_tokens - n  # the scheduler already advanced it by n
            p = r.num_prompt_tokens
            pre, dec = (n, 0) if before < p or before < r.num_tokens - 1 else (0, n)  # prompt, or recompute
            if ref is None:
                add_entry(RequestEntry(inf[0], pre, dec, before, inf[1], p))
            else:  # its first entry: with the middleware's reference
                add_entry(WireEntry(inf[0], pre, dec, before, inf[1], p, ref=ref))
        pending = self.pending
        if len(pending) >= MAX_PENDING:  # update_from_output never came for the oldest
            del pending[next(iter(pending))]
            self.sender.lost(1)
        item = pending[id(scheduler_output)] = [nst, t_schedule, entries, reqs, 0]
        return item

    def on_update(self, scheduler_output, t_end: float, idle: bool = False):
        """After ``Scheduler.update_from_output``: flag finished requests and emit the step. Returns the
        caller's slot of the step's pending item (None when the step was not observed)."""
        item = self.pending.pop(id(scheduler_output), None)
        if item is None:
            return None
        _, t_start, entries, reqs, slot = item
        if t_start < self.prev_end:
            t_start = self.prev_end
        fin = self.fin
        if max(map(_get_status, reqs)) > fin:  # C loop; Python only when something finished
            for i, r in enumerate(reqs):
                if r.status > fin:
                    self._finish(entries[i], r)
        record = StepRecord(self.step, t_start, t_end, entries)
        self.step += 1
        self.prev_end = t_end
        self.sender.send(record, t_end, idle)
        return slot

    def _finish(self, entry: RequestEntry, request) -> None:
        rid = request.request_id
        if rid not in self.info:  # already flagged
            return
        for later in self.pending.values():  # async scheduling: a later step still has it
            if rid in later[0]:
                return
        entry.finished = True
        entry.output_tokens = len(request.output_token_ids)
        del self.info[rid]

    def _sweep(self, requests) -> None:
        """Forget requests vLLM no longer has (aborted between steps)."""
        pending = [item[0] for item in self.pending.values()]
        self.info = {
            rid: inf
            for rid, inf in self.info.items()
            if rid in requests or any(rid in nst for nst in pending)
        }
        self.sweep_at = max(4096, 2 * len(self.info))
