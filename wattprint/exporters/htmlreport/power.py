"""Power over time: the measured power with the attributed power stacked under it, by phase and by
component, and idle (what the requests did not receive)."""

from __future__ import annotations

import numpy as np

from wattprint.exporters.htmlreport import style

MAX_BINS = 320


def _step_cumulative(t_start: np.ndarray, t_end: np.ndarray, energy_j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots of the cumulative energy of steps, each spread evenly over its span."""
    knots = np.maximum.accumulate(np.column_stack([t_start, t_end]).ravel())
    after = np.cumsum(energy_j)
    values = np.column_stack([after - energy_j, after]).ravel()
    return knots, values


def _binned(edges: np.ndarray, knots: np.ndarray, values: np.ndarray, clamp: bool = False) -> np.ndarray:
    """Mean power (W) in each bin of a cumulative-energy curve given at knots: nan outside the knots,
    or (``clamp``: steps, nothing before the first, everything after the last) zero there."""
    cum = np.interp(edges, knots, values) if clamp else np.interp(edges, knots, values, left=np.nan, right=np.nan)
    return np.diff(cum) / np.diff(edges)


def power_series(step_parts: dict[str, np.ndarray], intervals: list[dict[str, np.ndarray]]) -> dict:
    """Binned power: ``t`` (bin centres, s from the start), ``measured_w`` (all devices; nan outside the
    counter's span), per-part attributed power (``prefill_w`` ... ``static_w``) and ``idle_w``."""
    t0s, t1s = step_parts["t_start"], step_parts["t_end"]
    starts = [float(t0s[0])] + [float(iv["t0"][0]) for iv in intervals if len(iv["t0"])]
    ends = [float(t1s[-1])] + [float(iv["t1"][-1]) for iv in intervals if len(iv["t1"])]
    lo, hi = min(starts), max(ends)
    counter_dt = [float(np.median(iv["t1"] - iv["t0"])) for iv in intervals if len(iv["t0"])]
    width = max((hi - lo) / MAX_BINS, max(counter_dt, default=0.0), 1e-3)
    edges = lo + width * np.arange(int(np.ceil((hi - lo) / width)) + 1)
    out = {"t": (edges[:-1] + edges[1:]) / 2 - lo, "bin_s": width}
    measured = np.zeros(len(edges) - 1)
    for iv in intervals:
        knots = np.concatenate([iv["t0"][:1], iv["t1"]])
        measured += _binned(edges, knots, np.concatenate([[0.0], np.cumsum(iv["measured_j"])]))
    out["measured_w"] = measured if intervals else np.full(len(edges) - 1, np.nan)
    total = np.zeros(len(edges) - 1)
    for part in ("prefill", "decode", "compute", "weights", "kv", "static"):
        knots, values = _step_cumulative(t0s, t1s, step_parts[f"{part}_j"])
        out[f"{part}_w"] = _binned(edges, knots, values, clamp=True)
        if part in ("prefill", "decode"):
            total += out[f"{part}_w"]
    out["idle_w"] = np.clip(np.nan_to_num(out["measured_w"] - total, nan=0.0), 0.0, None)
    return out


def power_figure(series: dict, source: str, extrapolated_j: float = 0.0):
    """Two panels sharing time: by phase (top) and by component (bottom)."""
    words = style.source_words(source)
    with style.styled():
        fig = style.figure(style.FULL)
        top, bottom = fig.subplots(2, 1, sharex=True)
        t = series["t"]
        for ax, parts, colours, labels, title in (
            (top, ("prefill", "decode"), style.PHASES, {"prefill": "prefill", "decode": "decode"},
             "by phase"),
            (bottom, ("compute", "weights", "kv", "static"), style.COMPONENTS, style.COMPONENT_LABELS,
             "by component"),
        ):
            ys = [series[f"{p}_w"] for p in parts] + [series["idle_w"]]
            ax.stackplot(t, *ys, colors=[colours[p] for p in parts] + [style.IDLE], step="mid", linewidth=0,
                         labels=[labels[p] for p in parts] + ["idle (not given to requests)"])
            ax.step(t, series["measured_w"], where="mid", color=style.OKABE_ITO["black"], linewidth=1.1,
                    label=f"{'measured' if words.startswith('measured') else 'meter'} power ({words})")
            ax.set_title(title, loc="left")
            ax.set_ylabel("power (W)")
            ax.set_ylim(bottom=0)
            ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
        bottom.set_xlabel(f"time since the start of the run (s); bins of {series['bin_s'] * 1e3:.0f} ms")
        bottom.set_xlim(t[0] - series["bin_s"] / 2, t[-1] + series["bin_s"] / 2)
        if extrapolated_j > 0:
            bottom.annotate(f"steps after the counter's last change: {extrapolated_j:,.1f} J predicted by the "
                            "fitted model, not measured", xy=(0.0, -0.32), xycoords="axes fraction", fontsize=9)
    return fig
