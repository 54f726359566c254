"""Open a meter by name: ``auto``, ``nvml``, ``rapl``, ``cputime``, ``simulated`` or ``replay``.

``auto`` tries NVML, then RAPL, then the CPU-time estimate, and keeps why each earlier one failed.
Every meter returned has an ``auto_reason`` attribute saying how it was chosen; ``auto`` also logs it.
Keyword arguments go to the meter's constructor; under ``auto`` each candidate receives only those
its constructor accepts (``devices`` to NVML, ``root`` to RAPL, ``pids`` to cputime, ...).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

from wattprint.errors import InputError, MeterError
from wattprint.profiler.meters.base import Meter

log = logging.getLogger(__name__)

METER_NAMES = ("auto", "nvml", "rapl", "cputime", "simulated", "replay")
AUTO_ORDER = ("nvml", "rapl", "cputime")


def _factory(name: str) -> Callable[..., Meter]:
    """The meter class of ``name``, imported on demand (NVML and the simulator are optional)."""
    if name == "nvml":
        from wattprint.profiler.meters.nvml import NvmlMeter

        return NvmlMeter
    if name == "rapl":
        from wattprint.profiler.meters.rapl import RaplMeter

        return RaplMeter
    if name == "cputime":
        from wattprint.profiler.meters.cputime import CpuTimeMeter

        return CpuTimeMeter
    if name == "replay":
        from wattprint.profiler.meters.replay import ReplayMeter

        return ReplayMeter
    if name == "simulated":
        try:
            from wattprint.profiler.meters.simulated import SimulatedMeter
        except ImportError as exc:
            raise MeterError(f"the simulated meter is not available: {exc}") from exc
        return SimulatedMeter
    raise InputError(f"unknown meter {name!r}; choose one of {', '.join(METER_NAMES)}")


def _accepted(factory: Callable, kw: dict) -> dict:
    """The subset of ``kw`` that ``factory`` accepts."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kw)
    return {k: v for k, v in kw.items() if k in params}


def open_meter(name: str, **kw) -> Meter:
    """Open the meter ``name`` with ``kw``. Raises :class:`MeterError` when it (or, for ``auto``, every
    candidate) cannot be opened, and :class:`InputError` for an unknown name or option."""
    name = (name or "").strip().lower()
    if name not in METER_NAMES:
        raise InputError(f"unknown meter {name!r}; choose one of {', '.join(METER_NAMES)}")
    if name != "auto":
        factory = _factory(name)
        unknown = set(kw) - set(_accepted(factory, kw))
        if unknown:
            raise InputError(f"meter {name!r} takes no option {', '.join(sorted(unknown))}")
        meter = factory(**kw)
        meter.auto_reason = f"{name} requested"
        return meter

    factories = {n: _factory(n) for n in AUTO_ORDER}
    unknown = set(kw) - {k for f in factories.values() for k in _accepted(f, kw)}
    if unknown:
        raise InputError(f"no meter tried by 'auto' takes option {', '.join(sorted(unknown))}")
    failures: list[str] = []
    for candidate, factory in factories.items():
        try:
            meter = factory(**_accepted(factory, kw))
        except MeterError as exc:
            failures.append(f"{candidate}: {exc}")
            log.debug("auto meter: %s unavailable: %s", candidate, exc)
            continue
        reason = f"picked {candidate} (source {meter.source})"
        if failures:
            reason += "; " + "; ".join(failures)
        meter.auto_reason = reason
        log.info("auto meter: %s", reason)
        return meter
    raise MeterError("no meter could be opened: " + "; ".join(failures))
