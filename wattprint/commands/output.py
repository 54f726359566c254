"""The one writer of attribution outputs: ``requests.jsonl`` and ``summary.json`` with the conservation
figure (every command that attributes writes through here)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import msgspec

from wattprint.errors import ConservationError
from wattprint.files import atomic_write
from wattprint.profiler.core.results import RequestResult, Totals


def conservation_error(totals: Totals) -> float:
    """|attributed + idle - measured - extrapolated| / measured (the absolute gap when nothing was
    measured)."""
    gap = abs(totals.attributed_j + totals.idle_j - totals.measured_j - totals.extrapolated_j)
    return gap / totals.measured_j if totals.measured_j > 0 else gap


def check_conservation(totals: Totals, results: Sequence[RequestResult]) -> float:
    """Conservation over the totals and over the request records themselves (Σ records + idle ==
    measured + extrapolated); raises :class:`ConservationError` above its tolerance. Returns the error."""
    err = conservation_error(totals)
    gap = abs(sum(r.energy_j for r in results) + totals.idle_j - totals.measured_j - totals.extrapolated_j)
    err_records = gap / totals.measured_j if totals.measured_j > 0 else gap
    worst = max(err, err_records)
    if not worst <= ConservationError.TOLERANCE:  # NaN fails too
        raise ConservationError(
            f"conservation violated: totals off by {err:.3e}, request records off by {err_records:.3e} of "
            f"the measured {totals.measured_j:.6g} J (tolerance {ConservationError.TOLERANCE:g}); "
            "this is a bug in wattprint, please report it")
    return worst


def write_requests(path: str | os.PathLike, results: Sequence[RequestResult]) -> None:
    """One JSON line per request, written whole or not at all."""
    enc = msgspec.json.Encoder()
    atomic_write(path, b"".join(enc.encode(r) + b"\n" for r in results))


def summary_dict(totals: Totals | None, **extra) -> dict:
    """The totals as a dict with their conservation error, plus ``extra`` fields."""
    summary = msgspec.to_builtins(totals) if totals is not None else {}
    if totals is not None:
        summary["conservation_error"] = conservation_error(totals)
    summary.update(extra)
    return summary


def write_summary(path: str | os.PathLike, totals: Totals | None, **extra) -> dict:
    """``summary.json``: :func:`summary_dict`, indented; returns what was written."""
    summary = summary_dict(totals, **extra)
    atomic_write(path, msgspec.json.format(msgspec.json.encode(summary), indent=2) + b"\n")
    return summary
