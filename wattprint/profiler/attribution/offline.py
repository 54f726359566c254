"""Offline attribution of a whole trace: one global fit per device, vectorised over the trace."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

from wattprint.errors import InputError
from wattprint.profiler.attribution.coefficients import Coefficients, prior_coefficients
from wattprint.profiler.attribution.compact import CompactTrace
from wattprint.profiler.attribution.features import FAR_PAST_S
from wattprint.profiler.attribution.fit import fit_device, interval_fit
from wattprint.profiler.attribution.latency import estimate_latency_s, shifted
from wattprint.profiler.attribution.settle import (
    block_edges,
    extrapolate_after,
    settle_device,
    with_first_sample,
)
from wattprint.profiler.attribution.split import split_steps
from wattprint.profiler.attribution.table import add_breakdowns
from wattprint.profiler.core.costmodel import ModelGeometry
from wattprint.profiler.core.efficiency import IdealCost
from wattprint.profiler.core.hardware import HardwareProfile
from wattprint.profiler.core.parallel import iter_step_columns
from wattprint.profiler.core.records import EnergySample, StepRecord, StepTrace, is_parquet
from wattprint.profiler.core.results import RequestResult, Totals
from wattprint.profiler.timeline.counter import change_points, publish_mode


@dataclass
class Attribution:
    requests: list[RequestResult]
    totals: Totals
    step_energy_j: np.ndarray  # per step, summed over devices
    fit: list[dict]
    #: per step: t_start, t_end, and its energy by phase (prefill_j, decode_j) and by component
    #: (compute_j, weights_j, kv_j, static_j), summed over devices (for reports)
    step_parts: dict[str, np.ndarray] = field(default_factory=dict)
    #: per device: the counter's intervals (t0, t1, measured_j) and the fitted model's prediction for
    #: each (predicted_j), the fit's quality at a glance
    intervals: list[dict[str, np.ndarray]] = field(default_factory=list)


def _energy_by_device(samples: Sequence[EnergySample]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    dev = np.fromiter(map(attrgetter("device"), samples), np.int64, len(samples))
    t = np.fromiter(map(attrgetter("t"), samples), float, len(samples))
    e = np.fromiter(map(attrgetter("energy_j"), samples), float, len(samples))
    out = {}
    for d in np.unique(dev):
        m = dev == d
        out[int(d)] = (t[m], e[m])
    return out


def attribute(steps: Sequence[StepRecord] | StepTrace | CompactTrace, samples: Sequence[EnergySample],
              g: ModelGeometry, hw: HardwareProfile, *, source: str = "unknown", window_s: float = 2.0,
              model_name: str | None = None, energy_path: str = "energy.jsonl",
              coefficients: Sequence[Coefficients] | None = None) -> Attribution:
    """Offline attribution of a whole trace (one global fit per device).

    Edges: a device's first sample bounds the energy up to its time (it starts the first counter
    interval); steps after the counter's last change get the fitted model's prediction, reported as
    ``extrapolated_j`` (outside ``measured_j``). Only steps wholly outside the samples are refused.

    ``coefficients``: one per device, used as they are instead of fitting (to compare drivers).
    """
    if isinstance(steps, CompactTrace):
        trace = steps
    else:
        trace = CompactTrace(g)
        if isinstance(steps, StepTrace):
            trace.add(steps.steps, steps.entries)
        else:
            trace.add(list(steps))
    if trace.n_steps == 0:
        raise InputError("no steps to attribute")
    cols = trace.step_columns()
    table = trace.table
    devices = _energy_by_device(samples)
    n_dev = len(devices)
    table.ideal = IdealCost.of(g, hw, n_dev)
    t_first, t_last = float(cols.t_start[0]), float(cols.t_end[-1])
    n_steps = len(cols.t_start)
    step_energy, step_static, e_flop_step = np.zeros(n_steps), np.zeros(n_steps), np.zeros(n_steps)
    idle_j = measured_j = extrapolated_j = e_byte = 0.0
    fits, dev_measured, window, intervals = [], [], [math.inf, -math.inf], []
    for d, (t, e) in sorted(devices.items()):
        b_t, b_e, resets = change_points(t, e, publish_mode(source))
        outside = int(np.count_nonzero((cols.t_end < t[0]) | (cols.t_start > t[-1])))
        if len(b_t) == 0 or outside:
            have = f"samples span [{t[0]:.3f}, {t[-1]:.3f}] s" if len(b_t) else "the counter never changes"
            raise InputError(
                f"energy of device {d} does not cover the steps: {have}, steps span "
                f"[{t_first:.3f}, {t_last:.3f}] s ({outside} step(s) wholly outside the samples)", energy_path)
        b_t, b_e = with_first_sample(b_t, b_e, float(t[0]), float(e[0]))
        first_is_sample = bool(b_t[0] == t[0])
        latency = 0.0
        if coefficients is None:
            prior = prior_coefficients(hw, n_dev)
            coef, info = fit_device(cols, prior, b_t, b_e, float(b_t[0]))
            latency = estimate_latency_s(cols, coef, prior, b_t, b_e, first_is_sample=first_is_sample)
            if latency > 0:  # the counter's changes moved back by its latency, then the fit again
                b_t = shifted(b_t, latency, first_is_sample)
                coef, info = fit_device(cols, prior, b_t, b_e, float(b_t[0]))
        else:
            coef, info = coefficients[len(fits)], {"fixed": True}
        origin = float(b_t[0])
        info.update(device=d, counter_resets=resets, counter_latency_s=latency, **coef.as_dict())
        fits.append(info)
        intervals.append(interval_fit(cols, coef, b_t, b_e, origin))
        edges = block_edges(b_t, window_s)
        energy, idle, static, _ = settle_device(cols, coef, b_t[edges], b_e[edges], origin, -FAR_PAST_S)
        tail, tail_static = extrapolate_after(cols, coef, float(b_t[-1]))
        extrapolated_j += float(tail.sum())
        step_energy += energy + tail
        step_static += static + tail_static
        idle_j += float(idle.sum())
        m = float(b_e[-1] - b_e[0])
        measured_j += m
        dev_measured.append(m)
        e_flop_step += coef.flop_energy_j(cols)
        e_byte += coef.energy_per_byte_j
        window = [min(window[0], origin), max(window[1], float(b_t[-1]))]
    totals = Totals(
        measured_j=measured_j, attributed_j=0.0, idle_j=idle_j, source=source,
        t_start=window[0], t_end=window[1], steps=n_steps,
        device_measured_j=dev_measured, coefficients=fits[0] if len(fits) == 1 else {"devices": fits},
        extrapolated_j=extrapolated_j,
    )
    parts = {"t_start": cols.t_start, "t_end": cols.t_end}
    for i0, i1 in trace.ranges():  # the split, a range of steps at a time (bounded memory)
        c = trace.columns(i0, i1)
        split = split_steps(c, g, step_energy[i0:i1], step_static[i0:i1], e_flop_step[i0:i1], e_byte)
        table.add(c, split)
        add_breakdowns(totals, c, split, table)
        for k, v in step_parts(c, split).items():
            parts.setdefault(k, np.zeros(n_steps))[i0:i1] = v
    results = table.results(source, model_name)
    totals.requests = len(results)
    return Attribution(results, totals, step_energy, fits, parts, intervals)


def attribute_file(steps_path, samples: Sequence[EnergySample], g: ModelGeometry, hw: HardwareProfile,
                   **kw) -> Attribution:
    """:func:`attribute` on a ``steps.jsonl`` (or ``.parquet``) read a chunk at a time: memory grows by
    about 20 bytes per request-step entry (compact columns), not by the parsed records."""
    if is_parquet(steps_path):  # read straight into columns; pyarrow is imported only for Parquet files
        from wattprint.profiler.core.tracefiles import iter_step_columns_parquet as chunks
    else:  # on the usable cores (workers stopped however the loop ends)
        chunks = iter_step_columns
    trace = CompactTrace(g)
    with closing(chunks(steps_path)) as parts:
        for steps, entries in parts:
            trace.add(steps, entries)
    return attribute(trace, samples, g, hw, **kw)


def step_parts(cols, split) -> dict[str, np.ndarray]:
    """Each step's energy by phase and by component (sums of its entries)."""
    pre = np.where(split.is_prefill, split.energy, 0.0)
    out = {"prefill_j": cols.step_sums(pre), "decode_j": cols.step_sums(split.energy - pre)}
    for name in ("compute", "weights", "kv", "static"):
        out[f"{name}_j"] = cols.step_sums(getattr(split, name))
    return out
