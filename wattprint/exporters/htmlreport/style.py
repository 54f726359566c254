"""The report's look: a colour-blind-safe palette (Okabe & Ito), figure sizes, and figures as
self-contained ``data:`` URIs (PNG, base64)."""

from __future__ import annotations

import base64
import io
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg", force=False)  # no display: figures are only written to memory

from matplotlib.figure import Figure  # noqa: E402 (after the backend is chosen)

#: Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision deficiency
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73",
             "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7"}
IDLE = "#C9C9C9"
PHASES = {"prefill": OKABE_ITO["vermillion"], "decode": OKABE_ITO["sky"]}
COMPONENTS = {"compute": OKABE_ITO["blue"], "weights": OKABE_ITO["orange"], "kv": OKABE_ITO["green"],
              "static": OKABE_ITO["purple"]}
COMPONENT_LABELS = {"compute": "compute (FLOPs)", "weights": "weights (reading them)",
                    "kv": "KV cache traffic", "static": "static power"}
SERIES = [OKABE_ITO[k] for k in ("blue", "orange", "green", "vermillion", "purple", "sky", "yellow", "black")]

#: figures are drawn at DPI and shown at 100 px per inch: sharp on high-density laptop screens
DPI = 160
FULL = (12.0, 6.6)
HALF = (6.4, 4.3)

_RC = {"font.size": 10.5, "axes.titlesize": 11.5, "axes.titleweight": "bold", "axes.labelsize": 10.5,
       "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "axes.axisbelow": True, "grid.color": "#E6E6E6",
       "grid.linewidth": 0.8, "legend.fontsize": 9.5, "legend.frameon": False,
       "font.family": "DejaVu Sans", "svg.fonttype": "none"}


@contextmanager
def styled():
    """The report's matplotlib settings (local to the block: nothing global changes)."""
    with matplotlib.rc_context(_RC):
        yield


def figure(size: tuple[float, float] = HALF, **kw) -> Figure:
    return Figure(figsize=size, layout="constrained", **kw)


def data_uri(fig: Figure) -> tuple[str, int, int]:
    """The figure as a PNG ``data:`` URI and its display size in CSS pixels."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    w, h = fig.get_size_inches()
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), round(w * 100), round(h * 100)


def log_axis(ax, which: str) -> None:
    """A logarithmic ``x`` or ``y`` axis labelled with plain numbers (0.05, 1, 200), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def energy_unit(max_j: float) -> tuple[float, str]:
    """A divisor and unit that keep energy axes readable (J, kJ, MJ, kWh)."""
    if max_j >= 3.6e7:
        return 3.6e6, "kWh"
    if max_j >= 1e6:
        return 1e6, "MJ"
    if max_j >= 1e4:
        return 1e3, "kJ"
    return 1.0, "J"


def source_words(source: str) -> str:
    """How an energy source is named on an axis: ``measured`` only for hardware counters (the kind is
    :func:`wattprint.profiler.meters.base.source_kind`'s, the one rule)."""
    from wattprint.profiler.meters.base import source_kind

    kind = source_kind(source)
    return f"measured, {source}" if kind == "measured" else f"{kind}, not measured"
