"""The report's other figures: each request's energy by component, energy per output token against
batch size and context length, energy by stratum and by efficiency class, and the fit's quality."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator

from wattprint.exporters.htmlreport import style
from wattprint.profiler.core.results import RequestResult

CLASSES = tuple("ABCDEFG")
BARS_UP_TO = 120  # requests drawn as bars; more as a filled profile


def _col(requests: Sequence[RequestResult], name: str) -> np.ndarray:
    return np.fromiter((getattr(r, name) or 0.0 for r in requests), float, len(requests))


def request_split_figure(requests: Sequence[RequestResult]):
    """Every request's energy, largest first, split into components (phases when the file has none)."""
    energy = _col(requests, "energy_j")
    order = np.argsort(-energy, kind="stable")
    parts = {p: _col(requests, f"{p}_j")[order] for p in style.COMPONENTS}
    colours, labels = style.COMPONENTS, style.COMPONENT_LABELS
    if not any(v.any() for v in parts.values()):
        parts = {p: _col(requests, f"{p}_j")[order] for p in style.PHASES}
        colours, labels = style.PHASES, {p: p for p in style.PHASES}
    div, unit = style.energy_unit(float(energy.max(initial=0.0)))
    rank = np.arange(1, len(requests) + 1)
    with style.styled():
        fig = style.figure()
        ax = fig.subplots()
        bottom = np.zeros(len(requests))
        for p, v in parts.items():
            if len(requests) <= BARS_UP_TO:
                ax.bar(rank, v / div, bottom=bottom, color=colours[p], label=labels[p], width=0.85, linewidth=0)
            else:
                ax.fill_between(rank, bottom, bottom + v / div, step="mid", color=colours[p], label=labels[p],
                                linewidth=0)
            bottom = bottom + v / div
        ax.set_xlabel("requests, largest energy first (rank)")
        ax.set_ylabel(f"energy per request ({unit})")
        ax.set_xlim(0.5, len(requests) + 0.5)
        ax.legend(loc="upper right")
        top = max(1, len(requests) // 10)
        share = energy[order[:top]].sum() / energy.sum() if energy.sum() > 0 else 0.0
        ax.text(0.98, 0.55, f"the top {top:,} request(s) ({100 * top / len(requests):.0f} %)\n"
                f"used {100 * share:.0f} % of the energy", transform=ax.transAxes, ha="right", fontsize=9.5)
    return fig


def per_token_batch_figure(batch: np.ndarray, j_per_token: np.ndarray):
    """Each decoding step's decode energy per generated token against its batch size."""
    with style.styled():
        fig = style.figure()
        ax = fig.subplots()
        ax.scatter(batch, j_per_token, s=8, alpha=0.35, color=style.OKABE_ITO["blue"], linewidths=0,
                   label="one engine step", rasterized=True)
        sizes = np.unique(batch)
        med = [(b, np.median(j_per_token[batch == b])) for b in sizes if np.count_nonzero(batch == b) >= 3]
        if med:
            x, y = zip(*med)
            ax.plot(x, y, color=style.OKABE_ITO["black"], linewidth=1.6, label="median")
        style.log_axis(ax, "y")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("batch size (requests in the step)")
        ax.set_ylabel("decode energy per output token (J/token)")
        ax.legend(loc="upper right", markerscale=3)
    return fig


def per_token_context_figure(requests: Sequence[RequestResult]):
    """Each request's decode energy per output token against its mean context length while decoding."""
    rs = [r for r in requests if r.output_tokens > 0 and r.decode_j > 0]
    strata = sorted({r.stratum or "(none)" for r in rs})
    with style.styled():
        fig = style.figure()
        ax = fig.subplots()
        for k, s in enumerate(strata):
            sel = [r for r in rs if (r.stratum or "(none)") == s]
            x = [r.prompt_tokens + r.output_tokens / 2 for r in sel]
            y = [r.decode_j / r.output_tokens for r in sel]
            ax.scatter(x, y, s=10, alpha=0.6, color=style.SERIES[k % len(style.SERIES)], linewidths=0,
                       label=s if len(strata) <= 8 else None, rasterized=True)
        style.log_axis(ax, "x")
        style.log_axis(ax, "y")
        ax.set_xlabel("mean context while decoding: prompt + output/2 (tokens)")
        ax.set_ylabel("decode energy per output token (J/token)")
        if strata and len(strata) <= 8:
            ax.legend(title="stratum", loc="upper left", markerscale=2)
    return fig


def strata_classes_figure(requests: Sequence[RequestResult]):
    """Energy by stratum (split by phase) and by efficiency class (with request counts)."""
    strata = sorted({r.stratum or "(none)" for r in requests})
    by = {s: [0.0, 0.0] for s in strata}
    for r in requests:
        by[r.stratum or "(none)"][0] += r.prefill_j
        by[r.stratum or "(none)"][1] += r.decode_j
    classes = sorted(set(CLASSES) | {r.efficiency_class for r in requests if r.efficiency_class})
    cls_j = {c: 0.0 for c in classes}
    cls_n = {c: 0 for c in classes}
    for r in requests:
        if r.efficiency_class:
            cls_j[r.efficiency_class] += r.energy_j
            cls_n[r.efficiency_class] += 1
    div, unit = style.energy_unit(max([sum(v) for v in by.values()] + list(cls_j.values()) + [0.0]))
    with style.styled():
        fig = style.figure((style.HALF[0], style.HALF[1] * 1.25))
        left, right = fig.subplots(1, 2, width_ratios=[1.1, 1])
        y = np.arange(len(strata))
        pre = np.array([by[s][0] for s in strata]) / div
        dec = np.array([by[s][1] for s in strata]) / div
        left.barh(y, pre, color=style.PHASES["prefill"], label="prefill")
        left.barh(y, dec, left=pre, color=style.PHASES["decode"], label="decode")
        left.set_yticks(y, strata)
        left.invert_yaxis()
        left.set_xlabel(f"energy ({unit})")
        left.set_title("By stratum", loc="left")
        left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
        x = np.arange(len(classes))
        right.bar(x, [cls_j[c] / div for c in classes], color=style.OKABE_ITO["blue"])
        for i, c in enumerate(classes):
            if cls_n[c]:
                right.annotate(f"{cls_n[c]:,}", (i, cls_j[c] / div), ha="center", va="bottom", fontsize=8.5,
                               xytext=(0, 2), textcoords="offset points")
        right.set_xticks(x, classes)
        right.set_xlabel("class (A best)")
        right.set_ylabel(f"energy ({unit})")
        right.set_title("By efficiency class\n(numbers: requests)", loc="left")
        right.margins(y=0.12)
    return fig


def r_squared(measured: np.ndarray, predicted: np.ndarray) -> float:
    ss_tot = float(np.sum((measured - measured.mean()) ** 2)) if len(measured) else 0.0
    return 1.0 - float(np.sum((measured - predicted) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


def fit_figure(intervals: Sequence[dict[str, np.ndarray]], source: str):
    """The fitted model's prediction against the counter's energy, per counter interval."""
    with style.styled():
        fig = style.figure()
        ax = fig.subplots()
        hi = 0.0
        for d, iv in enumerate(intervals):
            m, p = iv["measured_j"], iv["predicted_j"]
            hi = max(hi, float(m.max(initial=0.0)), float(p.max(initial=0.0)))
            ax.scatter(m, p, s=7, alpha=0.35, linewidths=0, color=style.SERIES[d % len(style.SERIES)],
                       rasterized=True, label=f"device {d}: R² = {r_squared(m, p):.3f} ({len(m):,} intervals)")
        ax.plot([0, hi], [0, hi], color=style.OKABE_ITO["black"], linestyle="--", linewidth=1, label="prediction = counter")
        ax.set_xlabel(f"counter energy per interval (J, {style.source_words(source)})")
        ax.set_ylabel("fitted model's prediction (J)")
        ax.legend(loc="upper left", markerscale=2)
    return fig
