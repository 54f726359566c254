"""The engine-side hook: patches vLLM's ``Scheduler`` so that every engine step is reported.

:func:`install` patches ``vllm.v1.core.sched.scheduler.Scheduler`` at class level (so every subclass,
``AsyncScheduler`` included, is covered), after checking that this vLLM's internals look as expected:

* ``Scheduler.__init__``: after vLLM's own, the observer sends the engine's Hello.
* ``Scheduler.schedule``: takes ``time.monotonic()`` before vLLM's own, then hands the
  ``SchedulerOutput`` to :meth:`~wattprint.profiler.vllm.observer.StepObserver.on_schedule`.
* ``Scheduler.update_from_output``: after vLLM's own, takes ``time.monotonic()`` and hands the step to
  :meth:`~wattprint.profiler.vllm.observer.StepObserver.on_update` (idle when the scheduler has no
  requests left: the sender then sends at once).
* ``Scheduler.shutdown`` (if any): after vLLM's own, closes the observer's sender.

What is read from the scheduler, and how steps are cut, is :mod:`wattprint.profiler.vllm.observer`;
how records travel, :mod:`wattprint.profiler.transport.sender`. Our code never raises into vLLM: every
patched method catches our errors and hands them to the observer (one warning, then off after a few).

Environment (read in the EngineCore process):

* ``WATTPRINT_SIDECAR``: the sidecar address (a path or an ``ipc://`` URL). Without it the plugin
  (:mod:`wattprint.profiler.vllm.plugin`) installs no hook.
* ``WATTPRINT_HOOK_SENDER``: ``direct`` (default: encode and send in the engine thread) or ``thread``
  (a daemon thread encodes and sends; the engine thread only puts the record on a queue).
* ``WATTPRINT_HOOK_SNDHWM``: the sender's queue bound in records (default ``transport.SEND_HWM``).
* ``WATTPRINT_HOOK_STATS``: a file path; the hook then times its own code per step and writes a JSON
  summary there (:mod:`wattprint.profiler.vllm.stats`).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import time

from wattprint.profiler.transport import messages as transport
from wattprint.profiler.transport.sender import SENDERS
from wattprint.profiler.vllm.observer import StepObserver
from wattprint.profiler.vllm.stats import HookStats

logger = logging.getLogger("vllm.wattprint")

ENV_SENDER = "WATTPRINT_HOOK_SENDER"
ENV_SNDHWM = "WATTPRINT_HOOK_SNDHWM"
ENV_STATS = "WATTPRINT_HOOK_STATS"


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


def _patch(cls, obs: StepObserver, stats: HookStats | None) -> None:
    orig_init = cls.__init__
    orig_schedule = cls.schedule
    orig_update = cls.update_from_output
    monotonic = time.monotonic
    on_schedule, on_update = stats.timed() if stats is not None else (obs.on_schedule, obs.on_update)

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        if obs.enabled:
            try:
                obs.start(self)
            except Exception as exc:  # noqa: BLE001
                obs.error(exc)

    @functools.wraps(orig_schedule)
    def schedule(self, *args, **kwargs):
        t0 = monotonic()
        out = orig_schedule(self, *args, **kwargs)
        if obs.enabled:
            try:
                on_schedule(self, out, t0)
            except Exception as exc:  # noqa: BLE001
                obs.error(exc, out)
        return out

    @functools.wraps(orig_update)
    def update_from_output(self, scheduler_output, *args, **kwargs):
        out = orig_update(self, scheduler_output, *args, **kwargs)
        if obs.enabled:
            try:
                on_update(scheduler_output, monotonic(), not self.requests)
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
    kind = os.environ.get(ENV_SENDER, "direct").strip() or "direct"
    if kind not in SENDERS:
        raise ValueError(f"{ENV_SENDER} must be 'direct' or 'thread', got {kind!r}")
    hwm = int(os.environ.get(ENV_SNDHWM) or transport.SEND_HWM)
    sender = SENDERS[kind](transport.address(address), hwm)
    obs = StepObserver(sender, finished_above=finished_above)
    stats = None
    stats_path = os.environ.get(ENV_STATS)
    if stats_path:
        stats = HookStats(stats_path, kind, obs)
        atexit.register(stats.dump)
    _patch(cls, obs, stats)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=obs.after_fork_in_child)
    _observer = obs
    logger.info("wattprint: step hook installed (sidecar %s, sender %s)", sender.wire.address, kind)
    return True


def observer() -> StepObserver | None:
    """This process's observer (None when the hook is not installed)."""
    return _observer
