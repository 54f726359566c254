"""The page around the figures: one self-contained HTML document (inline CSS, images as ``data:``
URIs; no script, no external resource), and the summary table with every figure's source named."""

from __future__ import annotations

import html
from dataclasses import dataclass

from wattprint.profiler.meters.base import is_measured, source_kind

CSS = """
:root { color-scheme: light; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1a1a1a; background: #f6f6f4; }
main { max-width: 1360px; margin: 0 auto; padding: 18px 24px 40px; }
h1 { font-size: 1.5em; margin: 0.2em 0 0.1em; }
h2 { font-size: 1.1em; margin: 0 0 0.4em; }
.meta { color: #444; margin: 0 0 12px; }
.banner { border-left: 6px solid #D55E00; background: #fff3e8; padding: 10px 14px; margin: 10px 0 16px;
          font-weight: 600; }
.notes { border-left: 6px solid #0072B2; background: #eef5fb; padding: 8px 14px; margin: 10px 0 16px; }
.notes ul { margin: 4px 0; padding-left: 20px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 16px;
        align-items: start; }
section { background: #fff; border: 1px solid #e0e0dc; border-radius: 6px; padding: 14px 16px; }
section.wide { grid-column: 1 / -1; }
figure { margin: 0; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption, .caption { color: #444; font-size: 0.92em; margin-top: 6px; }
.missing { color: #7a3a00; background: #fff8ef; padding: 10px 12px; border-radius: 4px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 10px 4px 0; border-bottom: 1px solid #ecece8; vertical-align: top; }
td.num { text-align: right; white-space: nowrap; }
tr.sub td:first-child { padding-left: 18px; color: #333; }
.tag { display: inline-block; padding: 0 6px; border-radius: 3px; font-size: 0.85em; font-weight: 600; }
.tag.measured { background: #e3f3ec; color: #00563d; }
.tag.notmeasured { background: #fde6d8; color: #8a2f00; }
"""


@dataclass
class Section:
    title: str
    caption: str = ""
    image: tuple[str, int, int] | None = None  # data URI, width, height (CSS px)
    html: str = ""  # instead of an image
    missing: str = ""  # what is missing, when there is nothing to show
    wide: bool = False


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def source_tag(source: str) -> str:
    kind = source_kind(source)
    if kind == "measured":
        return f'<span class="tag measured">measured ({esc(source)})</span>'
    return f'<span class="tag notmeasured">{kind.upper()} ({esc(source)}): not a measurement</span>'


def _joules(v) -> str:
    return "—" if v is None else f"{float(v):,.2f}"


def summary_table(s: dict, source: str) -> str:
    """Totals with their shares of the metered energy and where each figure comes from."""
    measured = s.get("measured_j")
    m = float(measured) if measured else None
    meter = source_tag(source)
    derived = f"attributed from the {'measured' if is_measured(source) else 'metered'} energy ({esc(source)})"
    rows = [
        ("", "energy metered over the run", measured, meter),
        ("", "given to requests", s.get("attributed_j"), derived),
        ("sub", "prefill", s.get("prefill_j"), "phase"),
        ("sub", "decode", s.get("decode_j"), "phase"),
        ("sub", "compute (FLOPs)", s.get("compute_j"), "component"),
        ("sub", "weights (reading them)", s.get("weights_j"), "component"),
        ("sub", "KV cache traffic", s.get("kv_j"), "component"),
        ("sub", "static power", s.get("static_j"), "component"),
        ("", "idle (given to no request)", s.get("idle_j"), derived),
        ("", "extrapolated after the counter's last change", s.get("extrapolated_j"),
         "fitted model's prediction: not measured, not in the metered total"),
    ]
    out = ['<table><thead><tr><th>quantity</th><th class="num">joules</th><th class="num">share of metered</th>'
           "<th>source</th></tr></thead><tbody>"]
    for cls, name, v, src in rows:
        share = f"{100 * float(v) / m:.1f} %" if (v is not None and m) else "—"
        out.append(f'<tr class="{cls}"><td>{esc(name)}</td><td class="num">{_joules(v)}</td>'
                   f'<td class="num">{share}</td><td>{src}</td></tr>')
    out.append("</tbody></table>")
    facts = []
    for key, label in (("model", "model"), ("hardware", "hardware profile"), ("requests", "requests"),
                       ("steps", "engine steps"), ("conservation_error", "conservation error")):
        if s.get(key) is not None:
            v = s[key]
            facts.append((label, f"{v:.1e}" if key == "conservation_error" else f"{v:,}" if isinstance(v, int) else v))
    if s.get("t_start") is not None and s.get("t_end") is not None:
        facts.append(("metered window", f"{float(s['t_end']) - float(s['t_start']):,.1f} s"))
    if facts:
        out.append('<table style="margin-top:10px"><tbody>')
        out += [f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in facts]
        out.append("</tbody></table>")
    return "".join(out)


def render(title: str, meta: str, banner: str, notes: list[str], sections: list[Section]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>",
             f"<h1>{esc(title)}</h1>", f'<p class="meta">{meta}</p>']
    if banner:
        parts.append(f'<div class="banner" role="note">{banner}</div>')
    if notes:
        parts.append('<div class="notes"><strong>Not in this report:</strong><ul>')
        parts += [f"<li>{esc(n)}</li>" for n in notes]
        parts.append("</ul></div>")
    parts.append('<div class="grid">')
    for k, sec in enumerate(sections):
        parts.append(f'<section id="s{k}"{" class=wide" if sec.wide else ""}><h2>{esc(sec.title)}</h2>')
        if sec.image is not None:
            uri, w, h = sec.image
            parts.append(f'<figure><img src="{uri}" width="{w}" height="{h}" alt="{esc(sec.title)}">'
                         f"<figcaption>{esc(sec.caption)}</figcaption></figure>")
        elif sec.html:
            parts.append(sec.html + (f'<p class="caption">{esc(sec.caption)}</p>' if sec.caption else ""))
        else:
            parts.append(f'<p class="missing">{esc(sec.missing)}</p>')
        parts.append("</section>")
    parts.append("</div></main></body></html>")
    return "\n".join(parts)
