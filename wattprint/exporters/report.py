"""Human-readable reports (rich tables) of attributed energy. Every figure names its source."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from wattprint.profiler.core.results import RequestResult, Totals
from wattprint.profiler.meters.base import source_kind


def source_note(source: str) -> str:
    kind = source_kind(source)
    return f"measured ({source})" if kind == "measured" else f"{kind.upper()} ({source}): not a measurement"


def request_table(results: Sequence[RequestResult], *, limit: int = 25, title: str | None = None) -> Table:
    table = Table(title=title or "Energy per request", header_style="bold", show_lines=False)
    for name, kw in (("request", {}), ("stratum", {}), ("prompt", {"justify": "right"}),
                     ("output", {"justify": "right"}), ("energy J", {"justify": "right"}),
                     ("prefill J", {"justify": "right"}), ("decode J", {"justify": "right"}),
                     ("KV J", {"justify": "right"}), ("J/out tok", {"justify": "right"}), ("class", {"justify": "center"}),
                     ("source", {})):
        table.add_column(name, **kw)
    shown = list(results)[:limit] if limit else list(results)
    for r in shown:
        jpt = r.j_per_output_token
        table.add_row(r.id, r.stratum or "-", str(r.prompt_tokens), str(r.output_tokens), f"{r.energy_j:.3f}",
                      f"{r.prefill_j:.3f}", f"{r.decode_j:.3f}", f"{r.kv_j:.3f}",
                      f"{jpt:.4f}" if jpt is not None else "-", r.efficiency_class or "-", r.source)
    if limit and len(results) > limit:
        table.caption = f"{limit} of {len(results)} requests shown"
    return table


def totals_table(t: Totals) -> Table:
    table = Table(title="Totals", header_style="bold")
    table.add_column("quantity")
    table.add_column("joules", justify="right")
    table.add_column("share", justify="right")
    m = t.measured_j or 1.0
    for name, v in (("measured", t.measured_j), ("attributed to requests", t.attributed_j),
                    ("  prefill", t.prefill_j), ("  decode", t.decode_j), ("  of which KV cache", t.kv_j),
                    ("idle", t.idle_j)):
        table.add_row(name, f"{v:,.3f}", f"{100 * v / m:.1f} %")
    table.caption = (f"source: {source_note(t.source)}; conservation error "
                     f"{abs(t.attributed_j + t.idle_j - t.measured_j) / m:.1e}")
    return table


def print_report(results: Sequence[RequestResult], totals: Totals, *, limit: int = 25,
                 console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal and console.width < 132:
        console.width = 132
    console.print(request_table(results, limit=limit))
    console.print(totals_table(totals))
