"""Prometheus exposition of the sidecar (``/metrics``).

:class:`WattprintCollector` is a custom ``prometheus_client`` collector. Each scrape calls its
``snapshot_fn`` once and builds every metric from that one :class:`MetricsSnapshot`, taken at one
instant, so that within one exposition::

    sum(wattprint_energy_joules_total) + wattprint_idle_energy_joules_total
        == sum(wattprint_device_energy_joules_total) + wattprint_extrapolated_energy_joules_total

(up to float rounding). Conventions (``facts.md``): base units in names, ``_total`` on counters, bounded
label values only. A request id is never a label: it is the exemplar of the histogram bucket the
request fell in (OpenMetrics exposition only). Strata are normalised with
:func:`wattprint.profiler.core.strata.normalize` (anything unknown is ``unclassified``).

The HTTP server is :mod:`wattprint.exporters.api`; histogram state is :mod:`wattprint.exporters.histograms`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)

from wattprint.exporters.histograms import HistogramState
from wattprint.profiler.core.results import Totals
from wattprint.profiler.core.strata import normalize
from wattprint.profiler.meters.base import source_kind

#: Reasons of ``wattprint_dropped_records_total`` always exported (0 until it happens).
DROP_REASONS = ("queue_full", "hook_queue_full", "decode_error", "invalid", "no_hello", "unsupported_model",
                "internal_error")
PHASES = ("prefill", "decode")
COMPONENTS = ("compute", "weights", "kv", "static")

# ----------------------------------------------------------------------------------------- snapshot
@dataclass
class MetricsSnapshot:
    """Everything one scrape exports, taken at one instant.

    ``model_totals`` maps a served-model label to its cumulative :class:`Totals` (raw strata keys);
    measured, idle and per-device joules are summed over them, so conservation holds per exposition.
    """

    source: str
    device_names: list[str] = field(default_factory=list)
    device_power_w: list[float | None] = field(default_factory=list)
    model_totals: dict[str, Totals] = field(default_factory=dict)
    coefficients: dict = field(default_factory=dict)
    requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, stratum) -> finished
    request_energy: dict[tuple[str, str], HistogramState] = field(default_factory=dict)
    energy_per_token: dict[tuple[str, str], HistogramState] = field(default_factory=dict)
    steps: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    internal_errors: dict[str, int] = field(default_factory=dict)
    lag_s: float | None = None


def source_note(source: str) -> str:
    """How the joules were obtained, for HELP texts."""
    kind = source_kind(source)
    if kind == "measured":
        return f"source: {source}; measured by a hardware energy counter"
    return f"source: {source}; {kind}, not a measurement"


def _labelled(family, values: dict):
    """Fill a metric family from ``{label-value tuple: value}``, in a stable (sorted) order."""
    for key in sorted(values):
        family.add_metric(list(key), values[key])
    return family


def _finite(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class WattprintCollector:
    """Builds every wattprint metric from one :class:`MetricsSnapshot` per scrape."""

    def __init__(self, snapshot_fn: Callable[[], MetricsSnapshot]):
        self.snapshot_fn = snapshot_fn

    def describe(self):
        return []  # names are dynamic per scrape; registering must not call snapshot_fn

    def collect(self):
        snap = self.snapshot_fn()
        return self.families(snap)

    @staticmethod
    def families(snap: MetricsSnapshot) -> list:
        note = source_note(snap.source)
        out = []

        # -- measured, per device, and idle: summed over the models' totals
        n_dev = len(snap.device_names)
        for t in snap.model_totals.values():
            n_dev = max(n_dev, len(t.device_measured_j))
        dev_j = [0.0] * n_dev
        idle_j = 0.0
        for t in snap.model_totals.values():
            for i, v in enumerate(t.device_measured_j):
                dev_j[i] += float(v)
            idle_j += float(t.idle_j)
        if n_dev == 0 and snap.model_totals:
            dev_j = [sum(float(t.measured_j) for t in snap.model_totals.values())]
        m = CounterMetricFamily(
            "wattprint_device_energy_joules",
            f"Energy drawn by each device since attribution began ({note}). "
            "Equals the sum of wattprint_energy_joules_total and wattprint_idle_energy_joules_total.",
            labels=["device"], unit="joules",
        )
        if snap.model_totals:
            for i, v in enumerate(dev_j):
                m.add_metric([str(i)], v)
        out.append(m)

        m = GaugeMetricFamily(
            "wattprint_device_power_watts",
            f"Power of each device, averaged over about the last second of meter readings ({note}).",
            labels=["device"], unit="watts",
        )
        for i, p in enumerate(snap.device_power_w):
            if p is not None and math.isfinite(p):
                m.add_metric([str(i)], p)
        out.append(m)

        m = CounterMetricFamily(
            "wattprint_idle_energy_joules",
            f"Measured energy not attributed to any request: idle and unexplained ({note}).",
            unit="joules",
        )
        m.add_metric([], idle_j)
        out.append(m)

        m = CounterMetricFamily(
            "wattprint_extrapolated_energy_joules",
            f"Energy given to requests for steps after the counter's last change, predicted by the fitted "
            f"model at shutdown: an estimate, never counted as measured ({note}).",
            unit="joules",
        )
        m.add_metric([], sum(float(t.extrapolated_j) for t in snap.model_totals.values()))
        out.append(m)

        # -- attributed breakdowns, per served model, strata normalised
        energy: dict[tuple[str, str, str], float] = {}
        tokens: dict[tuple[str, str, str], float] = {}
        kv: dict[tuple[str, str], float] = {}
        kv_bytes: dict[tuple[str, str], float] = {}
        for model, t in snap.model_totals.items():
            for phase, by_stratum in (t.energy_j_by_phase_stratum or {}).items():
                for raw, v in by_stratum.items():
                    key = (model, str(phase), normalize(raw))
                    energy[key] = energy.get(key, 0.0) + float(v)
            for phase, by_stratum in (t.tokens_by_phase_stratum or {}).items():
                for raw, v in by_stratum.items():
                    key = (model, str(phase), normalize(raw))
                    tokens[key] = tokens.get(key, 0.0) + float(v)
            for raw, v in (t.kv_j_by_stratum or {}).items():
                key = (model, normalize(raw))
                kv[key] = kv.get(key, 0.0) + float(v)
            for direction, v in (("read", t.kv_read_bytes), ("write", t.kv_write_bytes)):
                kv_bytes[(model, direction)] = kv_bytes.get((model, direction), 0.0) + float(v)

        m = CounterMetricFamily(
            "wattprint_energy_joules",
            f"Measured energy attributed to requests, by engine phase (prefill|decode) and usage stratum "
            f"({note}; split between requests by the v1 cost model). Includes the KV-cache energy.",
            labels=["model", "phase", "stratum"], unit="joules",
        )
        out.append(_labelled(m, energy))

        m = CounterMetricFamily(
            "wattprint_kv_cache_energy_joules",
            f"Part of wattprint_energy_joules_total spent reading and writing the KV cache ({note}; "
            "cost-model share of the measured energy).",
            labels=["model", "stratum"], unit="joules",
        )
        out.append(_labelled(m, kv))

        m = CounterMetricFamily(
            "wattprint_component_energy_joules",
            f"wattprint_energy_joules_total by component (convention v2, {note}): compute (dynamic energy of "
            "FLOPs), weights (reading the weights), kv (the KV traffic's own dynamic energy), static (static "
            "power while busy).",
            labels=["model", "component"], unit="joules",
        )
        components = {(model, c): float(getattr(t, f"{c}_j")) for model, t in snap.model_totals.items()
                      for c in COMPONENTS}
        out.append(_labelled(m, components))

        m = CounterMetricFamily(
            "wattprint_kv_cache_bytes",
            "KV-cache bytes read and written by attention, from the cost model (estimated, not measured).",
            labels=["model", "direction"], unit="bytes",
        )
        out.append(_labelled(m, kv_bytes))

        m = CounterMetricFamily(
            "wattprint_tokens",
            "Tokens processed in attributed engine steps, by phase (prefill: prompt tokens, decode: output tokens).",
            labels=["model", "phase", "stratum"],
        )
        out.append(_labelled(m, tokens))

        m = CounterMetricFamily(
            "wattprint_requests",
            "Requests whose energy is final (finished and settled).",
            labels=["model", "stratum"],
        )
        out.append(_labelled(m, snap.requests))

        for name, doc, hists in (
            ("wattprint_request_energy_joules",
             f"Energy of each finished request ({note}; cost-model share). Exemplars carry the request id.",
             snap.request_energy),
            ("wattprint_energy_per_output_token_joules",
             f"Energy of each finished request divided by its output tokens ({note}; cost-model share). "
             "Exemplars carry the request id.",
             snap.energy_per_token),
        ):
            m = HistogramMetricFamily(name, doc, labels=["model", "stratum"], unit="joules")
            for key in sorted(hists):
                h = hists[key]
                m.add_metric(list(key), h.buckets(), h.sum)
            out.append(m)

        m = CounterMetricFamily("wattprint_steps", "Engine steps received from the hook and accepted for attribution.")
        m.add_metric([], snap.steps)
        out.append(m)

        m = CounterMetricFamily(
            "wattprint_dropped_records",
            "Step records not attributed, by reason (queue_full: sidecar queue; hook_queue_full: reported by "
            "the engine hook; decode_error: undecodable message; invalid: rejected record; no_hello: steps "
            "before any Hello; unsupported_model: model the cost model cannot describe; internal_error).",
            labels=["reason"],
        )
        dropped = {r: 0 for r in DROP_REASONS}
        dropped.update(snap.dropped)
        for reason in sorted(dropped):
            m.add_metric([reason], dropped[reason])
        out.append(m)

        m = CounterMetricFamily(
            "wattprint_internal_errors",
            "Problems the sidecar caught and survived (exceptions, a torn ledger line, an unsupported model), "
            "by where they happened.",
            labels=["where"],
        )
        for where in sorted(snap.internal_errors):
            m.add_metric([where], snap.internal_errors[where])
        out.append(m)

        m = GaugeMetricFamily(
            "wattprint_attribution_lag_seconds",
            "How far attribution trails the present: age of the newest settled energy window.",
            unit="seconds",
        )
        if snap.lag_s is not None and math.isfinite(snap.lag_s):
            m.add_metric([], snap.lag_s)
        out.append(m)

        m = InfoMetricFamily("wattprint_meter", "The energy meter and the devices it reads.",
                             labels=["source", "device_name"])
        for name in sorted(set(snap.device_names)):
            m.add_metric([snap.source, name], {})
        out.append(m)

        m = GaugeMetricFamily(
            "wattprint_model_coefficient",
            "Coefficients of the energy model in use (fitted online where the attributor fits them), by name.",
            labels=["name"],
        )
        for name in sorted(snap.coefficients):
            v = _finite(snap.coefficients[name])
            if v is not None:
                m.add_metric([str(name)], v)
        out.append(m)

        m = GaugeMetricFamily(
            "wattprint_model_coefficient_fitted",
            "1 where the counter's data determined the coefficient, 0 where it is still the hardware profile's "
            "(its prior), by name.",
            labels=["name"],
        )
        for flag, key in ((1.0, "fitted"), (0.0, "from_profile")):
            for name in sorted(snap.coefficients.get(key) or ()):
                m.add_metric([str(name)], flag)
        out.append(m)
        return out


def make_registry(snapshot_fn: Callable[[], MetricsSnapshot], collectors=()) -> CollectorRegistry:
    """A registry holding the wattprint collector and ``collectors`` (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WattprintCollector(snapshot_fn))
    for collector in collectors:
        registry.register(collector)
    return registry
