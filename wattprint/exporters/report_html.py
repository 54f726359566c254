"""The HTML report of a run: one self-contained file (figures embedded as PNG ``data:`` URIs, inline
CSS, no script, nothing fetched when it is opened).

``write_report(out, requests=..., summary=..., steps=..., attribution=...)``: ``requests`` and
``summary`` (the dict of ``summary.json``) are enough for the per-request figures; the power over time,
energy per token against batch size and the fit's quality need the per-step energy of an offline
attribution (:class:`~wattprint.profiler.attribution.offline.Attribution`) and the steps it attributed
(or just their :class:`StepCounts`).
What cannot be drawn is said on the page. Simulated or estimated energy is labelled so everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from wattprint.files import atomic_write
from wattprint.profiler.core.records import EntryArrays, StepRecord, StepTrace, entry_arrays
from wattprint.profiler.core.results import RequestResult
from wattprint.profiler.meters.base import source_kind

NEED_STEPS = "needs the engine steps and the energy samples (steps.jsonl, energy.jsonl) of the run"
CAPTIONS = {
    "Power over time": "The black line is the meter's power; the coloured areas under it are the power given to "
                       "requests (top: by phase, bottom: by component) and grey is idle power given to no request. "
                       "Attributed power can exceed the line briefly: a step's energy is spread evenly over the step.",
    "Summary": "Shares are of the metered energy; given to requests + idle = metered + extrapolated.",
    "Each request's energy": "Requests sorted by energy; each bar is split into the energy of its FLOPs, of its "
                             "share of reading the weights, of its KV cache traffic and of its share of static power.",
    "Energy per output token against batch size": "Each point is one engine step: its decode energy divided by the "
                                                  "tokens it generated. Larger batches share the weights' and static "
                                                  "energy between more tokens.",
    "Energy per output token against context length": "Each point is one request: its decode energy per output token "
                                                      "against the mean length of its context while it generated (a "
                                                      "longer context reads more KV cache per token).",
    "Energy by stratum and by efficiency class": "Left: energy of each usage stratum, by phase. Right: energy of the "
                                                 "requests in each efficiency class (A: closest to the best energy "
                                                 "their work can cost on this hardware).",
    "Fit quality": "Each point is one interval between counter updates: the energy the counter reported against the "
                   "fitted model's prediction for the steps in it. Points on the dashed line are predicted exactly; "
                   "R² is the share of the counter's variation the model explains.",
}


def _banner(source: str) -> str:
    kind = source_kind(source)
    if kind == "measured":
        return ""
    kind = "simulated by the GPU twin" if kind == "simulated" else "estimated, not read from a hardware counter"
    return (f"Every energy figure in this report is {kind} (source: {source}); none of it is a measurement. "
            "It shows how wattprint attributes energy, not what this hardware used.")


@dataclass
class StepCounts:
    """Each step's batch size (requests in it) and generated tokens: what the report needs of the steps
    (gathered a chunk at a time for traces too large to hold: :meth:`of` each chunk, then :meth:`concat`)."""

    batch: np.ndarray
    decode_tokens: np.ndarray

    @classmethod
    def of(cls, steps: Sequence[StepRecord] | StepTrace | EntryArrays) -> StepCounts:
        e = steps if isinstance(steps, EntryArrays) else (
            steps.entries if isinstance(steps, StepTrace) else entry_arrays(list(steps)))
        sizes = np.diff(e.offsets)
        return cls(sizes, np.bincount(np.repeat(np.arange(len(sizes)), sizes), e.decode, len(sizes)))

    @classmethod
    def concat(cls, parts: Sequence[StepCounts]) -> StepCounts:
        return cls(np.concatenate([p.batch for p in parts]), np.concatenate([p.decode_tokens for p in parts]))


def render_report(*, requests: Sequence[RequestResult], summary: dict,
                  steps: Sequence[StepRecord] | StepTrace | StepCounts | None = None, attribution=None,
                  notes: Sequence[str] = (), title: str | None = None) -> str:
    """The report as an HTML string (see :func:`write_report`)."""
    from wattprint.exporters.htmlreport import page, plots, power, style

    source = str(summary.get("source") or summary.get("meter") or (requests[0].source if requests else "unknown"))
    notes = list(notes)
    sections: list[page.Section] = []
    parts = getattr(attribution, "step_parts", None) or {}
    intervals = list(getattr(attribution, "intervals", None) or [])
    counts = steps if isinstance(steps, StepCounts) or steps is None else StepCounts.of(steps)

    def add(title: str, fig=None, **kw) -> None:
        image = style.data_uri(fig) if fig is not None else None
        sections.append(page.Section(title, caption=CAPTIONS.get(title, ""), image=image, **kw))

    if len(parts.get("t_start", ())):
        series = power.power_series(parts, intervals)
        add("Power over time", power.power_figure(series, source, float(summary.get("extrapolated_j") or 0.0)),
            wide=True)
    else:
        add("Power over time", wide=True, missing=f"Power over time {NEED_STEPS}.")
        notes.append(f"power over time, energy per token against batch size and the fit's quality: {NEED_STEPS}")
    add("Summary", html=page.summary_table(summary, source))
    if requests:
        add("Each request's energy", plots.request_split_figure(requests))
    else:
        add("Each request's energy", missing="No requests in the requests file.")
    if counts is not None and len(parts.get("decode_j", ())) == len(counts.batch) > 0:
        ok = counts.decode_tokens > 0
        if ok.any():
            add("Energy per output token against batch size", plots.per_token_batch_figure(
                counts.batch[ok], parts["decode_j"][ok] / counts.decode_tokens[ok]))
    if any(r.output_tokens > 0 and r.decode_j > 0 for r in requests):
        add("Energy per output token against context length", plots.per_token_context_figure(requests))
    if requests:
        add("Energy by stratum and by efficiency class", plots.strata_classes_figure(requests))
    if intervals:
        add("Fit quality", plots.fit_figure(intervals, source))
    elif parts:
        notes.append("fit quality: the attribution gave no counter intervals")
    model = summary.get("model") or "unknown model"
    hardware = summary.get("hardware") or "unknown hardware"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = (f"{page.esc(model)} on {page.esc(hardware)} · {len(requests):,} requests · energy: "
            f"{page.source_tag(source)} · generated {stamp} by wattprint")
    return page.render(title or f"wattprint report: {model}", meta, page.esc(_banner(source)), notes, sections)


def write_report(out_path: str | os.PathLike, *, requests: Sequence[RequestResult], summary: dict,
                 steps: Sequence[StepRecord] | StepTrace | StepCounts | None = None, attribution=None,
                 notes: Sequence[str] = (), title: str | None = None) -> Path:
    """Write the report (private file, written whole or not at all); returns its path."""
    text = render_report(requests=requests, summary=summary, steps=steps, attribution=attribution,
                         notes=notes, title=title)
    atomic_write(out_path, text.encode("utf-8"), mode=0o600)
    return Path(out_path)
