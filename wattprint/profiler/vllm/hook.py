"""The engine-side observer: one :class:`~wattprint.profiler.core.records.StepRecord` per vLLM engine step.

:func:`install` patches ``vllm.v1.core.sched.scheduler.Scheduler`` at class level (so every subclass,
``AsyncScheduler`` included, is covered):

* ``Scheduler.__init__``: after vLLM's own, sends a :class:`~wattprint.profiler.transport.messages.Hello`.
* ``Scheduler.schedule``: takes ``time.monotonic()`` before vLLM's own, then reads
  ``SchedulerOutput.num_scheduled_tokens`` (internal request id -> tokens this step) and, per request,
  ``Request.num_computed_tokens`` (already advanced by the scheduler, so the context before the step is
  ``num_computed_tokens - scheduled``), ``num_prompt_tokens``, ``num_tokens`` and
  ``sampling_params.extra_args['stratum']``.
* ``Scheduler.update_from_output``: after vLLM's own, takes ``time.monotonic()``, reads
  ``Request.status`` (finished and aborted requests), and emits the step.

A step spans from its ``schedule()`` to its ``update_from_output()``. With async scheduling (a batch
queue) the next ``schedule()`` runs before the previous ``update_from_output()``; the step then starts
at the previous step's end, so that steps never overlap. Steps where nothing was scheduled are not
emitted.

Tokens of a request in a step are prefill tokens while the request is catching up with tokens it
already has (its prompt, or after a preemption its prompt and outputs: recompute counts as prefill),
and decode tokens otherwise (speculative draft tokens included).

Request ids are the ids the caller gave vLLM: recent vLLM (whose ``EngineCoreRequest`` has an
``external_req_id`` field) appends ``-`` and 8 random hex digits (``InputProcessor.assign_request_id``,
unless ``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION``); the hook strips them. So ``LLM.generate`` gives
``RequestOutput.request_id`` (``"0"``, ``"1"``, ...), ``/v1/chat/completions`` the response id
``chatcmpl-<X>``, ``/v1/completions`` ``cmpl-<X>-<prompt index>`` (response id ``cmpl-<X>``).
Parallel-sampling children (``n > 1``) keep vLLM's prefix: ``"<index>_<id>"``.

Our code never raises into vLLM and never blocks: the first error is logged (one warning) and the step
is skipped; after ``_MAX_ERRORS`` errors the hook switches itself off. Records go out on a ZeroMQ PUSH
socket with ``zmq.NOBLOCK``, at most ``_BATCH_MAX`` records a ``Steps`` message: the direct sender
sends what gathered at most ``_FLUSH_S`` after a step ends, and at once when the scheduler has no
requests left (so a socket send, which wakes ZeroMQ's I/O thread, is not paid on every short step).
A full queue (``SNDHWM`` = records bound // ``_BATCH_MAX`` messages) drops the message and counts its
records in ``Steps.dropped_total``. ZeroMQ reconnects by itself; after a reconnect (seen on a socket
monitor polled every ``_MONITOR_PERIOD_S``) the Hello is sent again.

Environment (read in the EngineCore process):

* ``WATTPRINT_SIDECAR``: the sidecar address (a path or an ``ipc://`` URL). Without it: no hook.
* ``WATTPRINT_HOOK_SENDER``: ``direct`` (default: encode and send in the engine thread) or ``thread``
  (a daemon thread encodes and sends every ``_FLUSH_S``; the engine thread only puts the record on a
  ``queue.SimpleQueue`` bounded by the same records bound).
* ``WATTPRINT_HOOK_SNDHWM``: queue bound in records (default ``transport.SEND_HWM``).
* ``WATTPRINT_HOOK_STATS``: a file path; the hook then times its own code per step (wall:
  ``perf_counter_ns``, CPU: ``thread_time_ns``) and writes a JSON summary there every ~2 s, whenever
  the scheduler runs out of requests, and at shutdown (``{pid}`` is replaced by the process id).
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import operator
import os
import queue
import statistics
import threading
import time
from array import array

import zmq

from wattprint.profiler.transport import messages as transport
from wattprint.profiler.core.records import RequestEntry, StepRecord

logger = logging.getLogger("vllm.wattprint")

ENV_SENDER = "WATTPRINT_HOOK_SENDER"
ENV_SNDHWM = "WATTPRINT_HOOK_SNDHWM"
ENV_STATS = "WATTPRINT_HOOK_STATS"

_MAX_PENDING = 16  # scheduled steps awaiting update_from_output (vLLM keeps <= pipeline depth)
_MAX_ERRORS = 10
_MONITOR_PERIOD_S = 0.5  # how often the socket monitor is polled for reconnects
_STATS_PERIOD_S = 2.0
_LINGER_MS = 100  # at shutdown, wait at most this long to flush queued records
_FLUSH_S = 0.05  # direct mode: send at most this long after a step ends (and at once when idle)
_BATCH_MAX = 8  # records per Steps message at most; the ZeroMQ queue holds hwm // _BATCH_MAX messages
_HEX = frozenset("0123456789abcdef")
_get_status = operator.attrgetter("status")


def _strip_random_suffix(rid: str) -> str:
    """``"{external}-{8 hex}"`` -> ``"{external}"`` (vLLM's internal request id -> the client's)."""
    if len(rid) > 9 and rid[-9] == "-" and _HEX.issuperset(rid[-8:]):
        return rid[:-9]
    return rid


def _ids_randomized() -> bool:
    """Whether this vLLM appends a random suffix to request ids (it has ``external_req_id``, and the
    randomization is not disabled by ``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION``)."""
    try:
        from vllm.v1.engine import EngineCoreRequest
    except Exception:  # noqa: BLE001
        return False
    if "external_req_id" not in getattr(EngineCoreRequest, "__struct_fields__", ()):
        return False
    return os.environ.get("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "0") in ("", "0")


def _jsonable(obj) -> dict:
    return json.loads(json.dumps(obj, default=str))


def _model_config_dict(model_config) -> dict:
    """The served model's Hugging Face config as a plain dict ({} if unavailable)."""
    hf = getattr(model_config, "hf_config", None)
    if hf is not None and hasattr(hf, "to_dict"):
        try:
            return _jsonable(hf.to_dict())
        except Exception:  # noqa: BLE001
            pass
    path = os.path.join(str(getattr(model_config, "model", "")), "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return _jsonable(json.load(f))
    except (OSError, ValueError):
        return {}


def make_hello(scheduler, pid: int) -> transport.Hello:
    """The Hello of the engine that owns ``scheduler`` (reads ``scheduler.vllm_config``)."""
    import vllm

    vc = scheduler.vllm_config
    mc = vc.model_config
    name = getattr(mc, "served_model_name", None) or getattr(mc, "model", "") or ""
    if isinstance(name, (list, tuple)):
        name = name[0] if name else ""
    block_size = getattr(getattr(vc, "cache_config", None), "block_size", None)
    tp = getattr(getattr(vc, "parallel_config", None), "tensor_parallel_size", 1)
    return transport.Hello(
        pid=pid,
        model=str(name),
        model_config=_model_config_dict(mc),
        engine="vllm",
        engine_version=str(getattr(vllm, "__version__", "")),
        kv_block_size=int(block_size) if block_size is not None else None,
        tensor_parallel_size=int(tp or 1),
    )


class _Wire:
    """The PUSH socket, opened lazily in the thread that sends (after any fork)."""

    def __init__(self, address: str, hwm: int):
        self.address = address
        self.hwm = hwm
        self.ctx = None
        self.sock = None
        self.mon = None
        self.connects = 0
        self.next_check = 0.0

    def open(self) -> None:
        ctx = zmq.Context(io_threads=1)
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.LINGER, _LINGER_MS)
        sock.connect(self.address)
        try:
            self.mon = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
        except zmq.ZMQError:  # monitoring unsupported: no Hello after reconnects
            self.mon = None
        self.ctx, self.sock = ctx, sock

    def close(self) -> None:
        sock, ctx, mon = self.sock, self.ctx, self.mon
        self.ctx = self.sock = self.mon = None
        if mon is not None:
            mon.close(linger=0)
        if sock is not None:
            sock.close(linger=_LINGER_MS)
        if ctx is not None:
            ctx.term()

    def forget(self) -> None:
        """Drop (without closing) a socket inherited through fork()."""
        self.ctx = self.sock = self.mon = None
        self.connects = 0

    def send(self, data: bytes) -> bool:
        """Queue one message without blocking; False if it had to be dropped."""
        if self.sock is None:
            self.open()
        try:
            self.sock.send(data, zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # zmq.Again (queue full) or a closed socket
            return False

    def reconnected(self, now: float) -> bool:
        """True when a peer connected again after the first connection (polled every 0.5 s)."""
        if now < self.next_check or self.mon is None:
            return False
        self.next_check = now + _MONITOR_PERIOD_S
        again = False
        while self.mon.poll(0):
            from zmq.utils.monitor import recv_monitor_message

            event = recv_monitor_message(self.mon, zmq.NOBLOCK)
            if event.get("event") == zmq.EVENT_CONNECTED:
                self.connects += 1
                again = again or self.connects > 1
        return again


class _Stats:
    """The hook's own time per step (ns), kept only when ``WATTPRINT_HOOK_STATS`` is set."""

    def __init__(self, path: str, sender: str):
        self.path = path
        self.sender = sender
        self.ns = array("q")  # wall time (perf_counter_ns) of our code per step
        self.cpu_ns = array("q")  # CPU time of the engine thread in our code (thread_time_ns)
        self.nreq = array("q")
        self.next_dump = time.monotonic() + _STATS_PERIOD_S
        self.observer = None

    def add(self, ns: int, cpu_ns: int, nreq: int, now: float) -> None:
        if len(self.ns) < 5_000_000:
            self.ns.append(ns)
            self.cpu_ns.append(cpu_ns)
            self.nreq.append(nreq)
        if now >= self.next_dump:
            self.next_dump = now + _STATS_PERIOD_S
            self.dump()

    def dump(self) -> None:
        if self.observer is None or self.observer.hello is None:
            return  # no scheduler in this process (API server, worker): nothing to tell
        try:
            ns = sorted(self.ns)
            n = len(ns)
            q = (lambda p: ns[min(n - 1, int(p * n))] / 1000) if n else (lambda p: None)
            obs = self.observer
            summary = {
                "pid": os.getpid(),
                "sender": self.sender,
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
                "dropped_total": obs.dropped_total() if obs is not None else None,
                "errors": obs.errors if obs is not None else None,
            }
            path = self.path.replace("{pid}", str(os.getpid()))
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
            os.replace(tmp, path)
        except Exception:  # noqa: BLE001 - statistics must never hurt the engine
            pass


class StepObserver:
    """Turns scheduler calls into StepRecords and sends them (see the module docstring)."""

    def __init__(
        self,
        address: str,
        *,
        hwm: int = transport.SEND_HWM,
        sender: str = "direct",
        finished_above: int,
        strip_ids: bool = True,
    ):
        if sender not in ("direct", "thread"):
            raise ValueError(f"{ENV_SENDER} must be 'direct' or 'thread', got {sender!r}")
        self.pid = os.getpid()
        # ZeroMQ counts messages; a message carries 1.._BATCH_MAX records: at most ``hwm`` records queue.
        self.wire = _Wire(address, max(1, hwm // _BATCH_MAX))
        self.hwm = hwm
        self.sender = sender
        self.fin = int(finished_above)  # RequestStatus values above this are finished
        self.external_id = _strip_random_suffix if strip_ids else str
        self.enabled = True
        self.errors = 0
        self.step = 0
        self.prev_end = 0.0
        # id(SchedulerOutput) -> [num_scheduled_tokens, t_schedule, entries, requests, hook_ns]
        self.pending: dict[int, list] = {}
        self.info: dict[str, tuple] = {}  # internal request id -> (external id, stratum)
        self.sweep_at = 4096
        self.dropped = 0  # records the sending thread dropped (ZeroMQ queue full)
        self.queue_dropped = 0  # records the engine thread dropped (hook queue full, step never completed)
        self.hello: bytes | None = None
        # direct mode: records of the last <= _FLUSH_S, sent together
        self.batch: list[StepRecord] = []
        self.last_flush = 0.0
        # thread mode: the engine thread puts, the sender thread encodes and sends
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def after_fork_in_child(self) -> None:
        self.pid = os.getpid()
        self.wire.forget()
        self.pending.clear()
        self.batch = []
        self.queue = queue.SimpleQueue()
        self.thread = None
        self.hello = None

    def start(self, scheduler) -> None:
        """Send the Hello (once; again after reconnects)."""
        if self.hello is not None:
            return
        self.hello = transport.encode(make_hello(scheduler, self.pid))
        self._send_hello()

    def error(self, exc: BaseException, scheduler_output=None) -> None:
        self.errors += 1
        if scheduler_output is not None:
            self.pending.pop(id(scheduler_output), None)
        if self.errors == 1:
            logger.warning("wattprint: step hook error, step skipped (%s: %s)", type(exc).__name__, exc,
                           exc_info=exc)
        if self.errors >= _MAX_ERRORS and self.enabled:
            self.enabled = False
            logger.warning("wattprint: step hook switched off after %d errors", self.errors)

    def close(self, timeout_s: float = 0.3) -> None:
        """At engine shutdown: send what is queued (bounded wait), stop the sender thread, close the
        socket (ZeroMQ flushes for at most ``_LINGER_MS``), so that the process exits promptly."""
        self.enabled = False
        if self.batch:
            self.flush(time.monotonic())
        t = self.thread
        if t is not None:
            deadline = time.monotonic() + timeout_s
            while self.queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.005)
            self.thread = None  # the sender loop ends
            self.queue.put(None)  # wakes it
            t.join(timeout_s)
            if t.is_alive():
                return  # still sending: leave its socket alone
        self.wire.close()

    def dropped_total(self) -> int:
        return self.dropped + self.queue_dropped

    # -- per step ----------------------------------------------------------------------------

    def _new_info(self, rid: str, request) -> tuple:
        stratum = None
        sp = getattr(request, "sampling_params", None)
        extra = getattr(sp, "extra_args", None) if sp is not None else None
        if extra:
            s = extra.get("stratum")
            if s is not None:
                stratum = str(s)
        inf = self.info[rid] = (self.external_id(rid), stratum)
        return inf

    def on_schedule(self, scheduler, scheduler_output, t_schedule: float):
        """After ``Scheduler.schedule``: snapshot what each request does in this step."""
        if self.hello is None:
            self.start(scheduler)
        nst = scheduler_output.num_scheduled_tokens
        if not nst:
            if self.batch and t_schedule - self.last_flush >= _FLUSH_S:
                self.flush(t_schedule)
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
            if inf is None:
                inf = self._new_info(rid, r)
            before = r.num_computed_tokens - n  # the scheduler already advanced it by n
            p = r.num_prompt_tokens
            if before < p or (n > 1 and before < r.num_tokens - 1):  # prompt, or recompute
                add_entry(RequestEntry(inf[0], n, 0, before, inf[1], p))
            else:
                add_entry(RequestEntry(inf[0], 0, n, before, inf[1], p))
        pending = self.pending
        if len(pending) >= _MAX_PENDING:  # update_from_output never came for the oldest
            del pending[next(iter(pending))]
            self.queue_dropped += 1
        item = pending[id(scheduler_output)] = [nst, t_schedule, entries, reqs, 0]
        return item

    def on_update(self, scheduler_output, t_end: float, idle: bool = False):
        """After ``Scheduler.update_from_output``: flag finished requests and emit the step."""
        item = self.pending.pop(id(scheduler_output), None)
        if item is None:
            return None
        _, t_start, entries, reqs, sched_ns = item
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
        if self.sender == "direct":
            batch = self.batch
            batch.append(record)
            if idle or len(batch) >= _BATCH_MAX or t_end - self.last_flush >= _FLUSH_S:
                self.flush(t_end)
        elif self.queue.qsize() < self.hwm:
            if self.thread is None:
                self._start_thread()
            self.queue.put(record)
        else:
            self.queue_dropped += 1
        return sched_ns

    def _finish(self, entry: RequestEntry, request) -> None:
        rid = request.request_id
        if rid not in self.info:  # already flagged
            return
        for later in self.pending.values():  # async scheduling: a later step still has it
            if rid in later[0]:
                return
        entry.finished = True
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

    # -- sending -----------------------------------------------------------------------------

    def flush(self, now: float) -> None:
        """Direct mode: send the batched records as one Steps message, without blocking."""
        records, self.batch = self.batch, []
        self.last_flush = now
        if records:
            data = transport.encode(transport.Steps(self.pid, records, self.dropped + self.queue_dropped))
            if not self.wire.send(data):
                self.dropped += len(records)
        if now >= self.wire.next_check and self.wire.reconnected(now):
            self.wire.send(self.hello)

    def _send_hello(self) -> None:
        if self.sender == "direct":
            if self.batch:
                self.flush(time.monotonic())
            self.wire.send(self.hello)
        else:
            if self.thread is None:
                self._start_thread()
            self.queue.put(self.hello)

    def _start_thread(self) -> None:
        t = threading.Thread(target=self._run_sender, name="wattprint-sender", daemon=True)
        self.thread = t
        t.start()

    def _run_sender(self) -> None:
        q, wire, pid = self.queue, self.wire, self.pid
        try:
            while self.thread is threading.current_thread():
                try:
                    item = q.get(timeout=_MONITOR_PERIOD_S)
                except queue.Empty:
                    item = None
                records = []
                while item is not None:
                    if type(item) is bytes:  # a Hello: keep the order
                        if records:
                            self._send_records(records, pid)
                            records = []
                        wire.send(item)
                    else:
                        records.append(item)
                    if len(records) >= _BATCH_MAX:
                        self._send_records(records, pid)
                        records = []
                    try:
                        item = q.get_nowait()
                    except queue.Empty:
                        item = None
                if records:
                    self._send_records(records, pid)
                if self.hello is not None and wire.sock is not None and wire.reconnected(time.monotonic()):
                    wire.send(self.hello)
                time.sleep(_FLUSH_S)  # let records gather: fewer, larger messages, fewer wake-ups
        except Exception as exc:  # noqa: BLE001
            self.error(exc)

    def _send_records(self, records: list, pid: int) -> None:
        data = transport.encode(transport.Steps(pid, records, self.dropped + self.queue_dropped))
        if not self.wire.send(data):
            self.dropped += len(records)


def _check_layout():
    """Import what the hook touches; raise if this vLLM's internals look unfamiliar."""
    import dataclasses

    from vllm.v1.core.sched import scheduler as scheduler_module
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request, RequestStatus

    cls = scheduler_module.Scheduler
    for name in ("__init__", "schedule", "update_from_output"):
        if not callable(getattr(cls, name, None)):
            raise RuntimeError(f"unknown vLLM internals: Scheduler.{name} missing")
    fields = {f.name for f in dataclasses.fields(SchedulerOutput)}
    if "num_scheduled_tokens" not in fields:
        raise RuntimeError("unknown vLLM internals: SchedulerOutput.num_scheduled_tokens missing")
    if not isinstance(getattr(Request, "num_tokens", None), property):
        raise RuntimeError("unknown vLLM internals: Request.num_tokens missing")
    return cls, int(RequestStatus.PREEMPTED)


def _patch(cls, obs: StepObserver, stats: _Stats | None) -> None:
    orig_init = cls.__init__
    orig_schedule = cls.schedule
    orig_update = cls.update_from_output
    monotonic = time.monotonic
    clock_ns = time.perf_counter_ns
    cpu_ns = time.thread_time_ns

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        if obs.enabled:
            try:
                obs.start(self)
            except Exception as exc:  # noqa: BLE001
                obs.error(exc)

    if stats is None:

        @functools.wraps(orig_schedule)
        def schedule(self, *args, **kwargs):
            t0 = monotonic()
            out = orig_schedule(self, *args, **kwargs)
            if obs.enabled:
                try:
                    obs.on_schedule(self, out, t0)
                except Exception as exc:  # noqa: BLE001
                    obs.error(exc, out)
            return out

        @functools.wraps(orig_update)
        def update_from_output(self, scheduler_output, *args, **kwargs):
            out = orig_update(self, scheduler_output, *args, **kwargs)
            if obs.enabled:
                try:
                    obs.on_update(scheduler_output, monotonic(), not self.requests)
                except Exception as exc:  # noqa: BLE001
                    obs.error(exc, scheduler_output)
            return out

    else:

        @functools.wraps(orig_schedule)
        def schedule(self, *args, **kwargs):
            t0 = monotonic()
            out = orig_schedule(self, *args, **kwargs)
            if obs.enabled:
                s, c = clock_ns(), cpu_ns()
                try:
                    item = obs.on_schedule(self, out, t0)
                    if item is not None:
                        item[4] = (clock_ns() - s, cpu_ns() - c)
                except Exception as exc:  # noqa: BLE001
                    obs.error(exc, out)
            return out

        @functools.wraps(orig_update)
        def update_from_output(self, scheduler_output, *args, **kwargs):
            out = orig_update(self, scheduler_output, *args, **kwargs)
            if obs.enabled:
                s, c = clock_ns(), cpu_ns()
                try:
                    nreq = len(scheduler_output.num_scheduled_tokens)
                    now = monotonic()
                    sched = obs.on_update(scheduler_output, now, not self.requests)
                    if sched:
                        d_cpu = cpu_ns() - c
                        stats.add(sched[0] + clock_ns() - s, sched[1] + d_cpu, nreq, now)
                    if not self.requests:  # idle: a good moment to write the summary
                        stats.dump()
                except Exception as exc:  # noqa: BLE001
                    obs.error(exc, scheduler_output)
            return out

    orig_shutdown = getattr(cls, "shutdown", None)
    if callable(orig_shutdown):

        @functools.wraps(orig_shutdown)
        def shutdown(self, *args, **kwargs):
            try:
                return orig_shutdown(self, *args, **kwargs)
            finally:
                try:
                    obs.close()
                    if stats is not None:
                        stats.dump()
                except Exception:  # noqa: BLE001
                    pass

        cls.shutdown = shutdown
    cls.__init__ = __init__
    cls.schedule = schedule
    cls.update_from_output = update_from_output
    cls._wattprint_hooked = True


_observer: StepObserver | None = None


def install(address: str | None = None) -> bool:
    """Patch vLLM's Scheduler (once per process). Raises if vLLM's internals are unfamiliar."""
    global _observer
    cls, finished_above = _check_layout()
    if getattr(cls, "_wattprint_hooked", False):
        return True
    sender = os.environ.get(ENV_SENDER, "direct").strip() or "direct"
    hwm = int(os.environ.get(ENV_SNDHWM) or transport.SEND_HWM)
    obs = StepObserver(
        transport.address(address),
        hwm=hwm,
        sender=sender,
        finished_above=finished_above,
        strip_ids=_ids_randomized(),
    )
    stats = None
    stats_path = os.environ.get(ENV_STATS)
    if stats_path:
        stats = _Stats(stats_path, sender)
        stats.observer = obs
        atexit.register(stats.dump)
    _patch(cls, obs, stats)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=obs.after_fork_in_child)
    _observer = obs
    logger.info("wattprint: step hook installed (sidecar %s, sender %s)", obs.wire.address, sender)
    return True


def observer() -> StepObserver | None:
    """This process's observer (None when the hook is not installed)."""
    return _observer
