"""The Prometheus collector and the sidecar's HTTP server, on hand-made snapshots (no sidecar)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from wattprint.exporters.api import MetricsServer, make_app
from wattprint.exporters.histograms import REQUEST_ENERGY_BUCKETS_J, HistogramState
from wattprint.exporters.prometheus import DROP_REASONS, MetricsSnapshot, make_registry, source_note
from wattprint.profiler.core.results import RequestResult, Totals


def _totals(scale: float = 1.0, source: str = "nvml") -> Totals:
    # raw strata as a client may send them: known, differently cased, unknown, none
    e = {
        "prefill": {"critical": 10.0 * scale, "Science ": 5.0 * scale, "bogus": 3.0 * scale, "": 2.0 * scale},
        "decode": {"critical": 40.0 * scale, "productive": 20.0 * scale, "": 0.5 * scale},
    }
    attributed = sum(v for d in e.values() for v in d.values())
    idle = 119.5 * scale
    return Totals(
        measured_j=attributed + idle, attributed_j=attributed, idle_j=idle, source=source,
        device_measured_j=[(attributed + idle) * 0.6, (attributed + idle) * 0.4],
        coefficients={"energy_per_flop_j": 1.2e-12, "energy_per_byte_j": 6e-11, "bad": float("nan"), "text": "x"},
        energy_j_by_phase_stratum=e,
        kv_j_by_stratum={"critical": 4.0 * scale, "bogus": 1.0 * scale},
        tokens_by_phase_stratum={"prefill": {"critical": 100.0, "bogus": 7.0}, "decode": {"critical": 30.0, "": 3.0}},
        kv_read_bytes=1e9 * scale, kv_write_bytes=2e8 * scale, steps=12, requests=3,
    )


def _snapshot(source: str = "nvml") -> MetricsSnapshot:
    h = HistogramState(REQUEST_ENERGY_BUCKETS_J)
    h.observe(3.0, "chatcmpl-abc123-0f0f0f0f", 1_700_000_000.0)
    h.observe(0.05, "cmpl-tiny", 1_700_000_001.0)
    h.observe(1e6, "cmpl-huge", 1_700_000_002.0)
    t = HistogramState((0.1, 1.0))
    t.observe(0.3, "chatcmpl-abc123-0f0f0f0f", 1_700_000_000.0)
    return MetricsSnapshot(
        source=source,
        device_names=["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"],
        device_power_w=[350.0, 120.5],
        model_totals={"llama-8b": _totals(1.0, source), "qwen": _totals(0.5, source)},
        coefficients={"energy_per_flop_j": 1.2e-12, "bad": float("nan"), "text": "x"},
        requests={("llama-8b", "critical"): 2, ("llama-8b", "unclassified"): 1},
        request_energy={("llama-8b", "critical"): h},
        energy_per_token={("llama-8b", "critical"): t},
        steps=12, dropped={"decode_error": 2, "hook_queue_full": 5}, internal_errors={"reading": 1}, lag_s=1.25,
    )


def _samples(families):
    return [s for f in families for s in f.samples]


def _value(families, name, **labels):
    out = [s.value for s in _samples(families) if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert out, f"no sample {name} {labels}"
    return sum(out)


def test_text_exposition_parses_and_conserves():
    text = generate_latest(make_registry(_snapshot)).decode()
    fams = list(parse_text(text))
    names = {f.name for f in fams}
    for expected in (
        "wattprint_device_energy_joules", "wattprint_device_power_watts", "wattprint_energy_joules",
        "wattprint_idle_energy_joules", "wattprint_kv_cache_energy_joules", "wattprint_kv_cache_bytes",
        "wattprint_tokens", "wattprint_requests", "wattprint_request_energy_joules",
        "wattprint_energy_per_output_token_joules", "wattprint_steps", "wattprint_dropped_records",
        "wattprint_attribution_lag_seconds", "wattprint_meter_info", "wattprint_model_coefficient",
    ):
        assert expected in names, expected
    samples = _samples(fams)
    measured = sum(s.value for s in samples if s.name == "wattprint_device_energy_joules_total")
    attributed = sum(s.value for s in samples if s.name == "wattprint_energy_joules_total")
    idle = _value(fams, "wattprint_idle_energy_joules_total")
    expected_measured = _totals(1.0).measured_j + _totals(0.5).measured_j
    assert measured == pytest.approx(expected_measured, rel=1e-12)
    assert attributed + idle == pytest.approx(measured, rel=1e-12)
    # per-device figures come from the totals, summed over models
    assert _value(fams, "wattprint_device_energy_joules_total", device="0") == pytest.approx(expected_measured * 0.6)


def test_strata_normalised_and_merged():
    fams = list(parse_text(generate_latest(make_registry(_snapshot)).decode()))
    strata = {s.labels["stratum"] for s in _samples(fams) if "stratum" in s.labels}
    assert strata <= {"critical", "science", "productive", "agentic", "unclassified"}
    # "bogus" and "" merge into unclassified; "Science " normalises to science
    assert _value(fams, "wattprint_energy_joules_total", model="llama-8b", phase="prefill",
                  stratum="unclassified") == pytest.approx(5.0)
    assert _value(fams, "wattprint_energy_joules_total", model="llama-8b", phase="prefill",
                  stratum="science") == pytest.approx(5.0)
    assert _value(fams, "wattprint_kv_cache_energy_joules_total", model="qwen", stratum="unclassified") == 0.5
    assert _value(fams, "wattprint_tokens_total", model="llama-8b", phase="decode", stratum="unclassified") == 3.0
    assert _value(fams, "wattprint_kv_cache_bytes_total", model="llama-8b", direction="read") == 1e9
    assert {s.labels["phase"] for s in _samples(fams) if s.name == "wattprint_energy_joules_total"} == {
        "prefill", "decode"}


def test_other_metrics_values():
    fams = list(parse_text(generate_latest(make_registry(_snapshot)).decode()))
    assert _value(fams, "wattprint_device_power_watts", device="1") == 120.5
    assert _value(fams, "wattprint_attribution_lag_seconds") == 1.25
    assert _value(fams, "wattprint_steps_total") == 12
    assert _value(fams, "wattprint_requests_total", model="llama-8b", stratum="critical") == 2
    dropped = {s.labels["reason"]: s.value for s in _samples(fams) if s.name == "wattprint_dropped_records_total"}
    assert set(DROP_REASONS) <= set(dropped)
    assert dropped["decode_error"] == 2 and dropped["hook_queue_full"] == 5 and dropped["queue_full"] == 0
    info = [s for s in _samples(fams) if s.name == "wattprint_meter_info"]
    assert len(info) == 1 and info[0].labels == {"source": "nvml", "device_name": "NVIDIA H100 80GB HBM3"}
    coeffs = {s.labels["name"]: s.value for s in _samples(fams) if s.name == "wattprint_model_coefficient"}
    assert coeffs == {"energy_per_flop_j": 1.2e-12}  # non-finite and non-numeric values are left out
    # histogram: cumulative buckets, +Inf == count, sum
    buckets = {s.labels["le"]: s.value for s in _samples(fams)
               if s.name == "wattprint_request_energy_joules_bucket"}
    assert buckets["0.1"] == 1 and buckets["5.0"] == 2 and buckets["+Inf"] == 3
    assert _value(fams, "wattprint_request_energy_joules_count") == 3
    assert _value(fams, "wattprint_request_energy_joules_sum") == pytest.approx(1e6 + 3.05)


def test_openmetrics_exemplars_and_no_ids_in_labels():
    text = generate_openmetrics(make_registry(_snapshot)).decode()
    assert text.rstrip().endswith("# EOF")
    fams = list(parse_openmetrics(text))
    exemplars = [s for s in _samples(fams) if s.exemplar is not None]
    ids = {s.exemplar.labels["request_id"] for s in exemplars}
    assert ids == {"chatcmpl-abc123-0f0f0f0f", "cmpl-tiny", "cmpl-huge"}
    bucket = next(s for s in exemplars if s.exemplar.labels["request_id"] == "chatcmpl-abc123-0f0f0f0f"
                  and s.name == "wattprint_request_energy_joules_bucket")
    assert bucket.labels["le"] == "5.0" and bucket.exemplar.value == 3.0
    for s in _samples(fams):
        assert "request_id" not in s.labels and "id" not in s.labels
        for v in s.labels.values():
            assert "cmpl" not in v
    # the units are declared
    assert "# UNIT wattprint_energy_joules joules" in text


def test_help_texts_name_the_source_kind():
    for source, word in (("nvml", "measured"), ("simulated", "simulated"), ("cputime-estimate", "estimated")):
        text = generate_latest(make_registry(lambda s=source: _snapshot(s))).decode()
        for metric in ("wattprint_device_energy_joules_total", "wattprint_energy_joules_total",
                       "wattprint_idle_energy_joules_total", "wattprint_kv_cache_energy_joules_total",
                       "wattprint_request_energy_joules", "wattprint_energy_per_output_token_joules",
                       "wattprint_device_power_watts"):
            help_line = next(line for line in text.splitlines() if line.startswith(f"# HELP {metric} "))
            assert f"source: {source}" in help_line and word in help_line, help_line
    assert "not a measurement" in source_note("replay:simulated")
    assert "measured" in source_note("replay:nvml") and "not" not in source_note("replay:nvml")


def test_empty_snapshot_exposes_cleanly():
    text = generate_latest(make_registry(lambda: MetricsSnapshot(source="simulated"))).decode()
    fams = list(parse_text(text))
    assert _value(fams, "wattprint_idle_energy_joules_total") == 0
    assert not [s for s in _samples(fams) if s.name == "wattprint_device_energy_joules_total"]


def test_one_snapshot_per_scrape():
    calls = []

    def snap():
        calls.append(1)
        return _snapshot()

    registry = make_registry(snap)
    assert calls == []  # registering does not scrape
    generate_latest(registry)
    assert len(calls) == 1


def test_histogram_bucket_edges():
    h = HistogramState((1.0, 2.0))
    for v in (1.0, 1.5, 2.0, 2.5, float("nan")):
        h.observe(v, "x")
    assert h.counts == [1, 2, 1] and h.count == 4
    assert [b[1] for b in h.buckets()] == [1, 3, 4]
    h.observe(0.5, "y" * 500)
    assert len(h.exemplars[0][0]) + len("request_id") <= 128


# ------------------------------------------------------------------------------------------ HTTP
def _get(url: str, accept: str | None = None):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _result(rid: str, status: str = "final") -> RequestResult:
    return RequestResult(id=rid, energy_j=12.0, prefill_j=2.0, decode_j=10.0, kv_j=1.0, kv_read_bytes=1e6,
                         kv_write_bytes=1e5, prompt_tokens=10, output_tokens=4, flops=1e12, stratum="science",
                         source="nvml", model="llama-8b", status=status)


def test_http_server_routes():
    known: dict[str, RequestResult] = {}
    healthy = [True]
    app = make_app(make_registry(_snapshot), known.get, lambda: (healthy[0], {"model": "llama-8b"}))
    server = MetricsServer(app, "127.0.0.1", 0).start()
    try:
        assert server.port > 0
        base = server.url
        status, headers, body = _get(f"{base}/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert b"wattprint_energy_joules_total" in body and b"# EOF" not in body
        status, headers, body = _get(f"{base}/metrics", "application/openmetrics-text; version=1.0.0")
        assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
        assert b"# EOF" in body and b'# {request_id="cmpl-tiny"}' in body

        rid = "chatcmpl-a/b c%25é"  # decoded exactly once, UTF-8
        url = f"{base}/v1/requests/{urllib.request.quote(rid, safe='')}"
        status, _, body = _get(url)
        assert status == 404 and "error" in json.loads(body)
        known[rid] = _result(rid, "provisional")
        status, _, body = _get(url)
        data = json.loads(body)
        assert status == 200 and data["status"] == "provisional" and data["id"] == rid
        known[rid] = _result(rid)
        status, headers, body = _get(url)
        data = json.loads(body)
        assert status == 200 and data["status"] == "final" and data["energy_j"] == 12.0
        assert data["j_per_output_token"] == 3.0 and headers["Content-Type"] == "application/json"

        status, _, body = _get(f"{base}/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok", "model": "llama-8b"}
        healthy[0] = False
        status, _, body = _get(f"{base}/healthz")
        assert status == 503 and json.loads(body)["status"] == "unhealthy"
        assert _get(f"{base}/nope")[0] == 404
        head = urllib.request.Request(f"{base}/healthz", method="HEAD")
        with pytest.raises(urllib.error.HTTPError) as info:  # still unhealthy
            urllib.request.urlopen(head, timeout=5)
        assert info.value.code == 503 and info.value.read() == b""
        post = urllib.request.Request(f"{base}/healthz", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(post, timeout=5)
        assert info.value.code == 405
    finally:
        server.stop()


def test_http_lookup_failure_is_500_not_a_crash():
    def boom(rid):
        raise RuntimeError("boom")

    server = MetricsServer(make_app(make_registry(_snapshot), boom), "127.0.0.1", 0).start()
    try:
        assert _get(f"{server.url}/v1/requests/x")[0] == 500
        assert _get(f"{server.url}/metrics")[0] == 200
    finally:
        server.stop()


@pytest.mark.prometheus
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_check_metrics():
    # promtool lints the Prometheus text format (it does not parse OpenMetrics)
    data = generate_latest(make_registry(_snapshot))
    proc = subprocess.run(["promtool", "check", "metrics"], input=data, capture_output=True, timeout=30)
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, out
    assert not out.strip(), out  # no lint warnings either


def test_nan_values_do_not_break_exposition():
    snap = _snapshot()
    snap.device_power_w = [float("nan"), None]
    snap.lag_s = math.inf
    fams = list(parse_text(generate_latest(make_registry(lambda: snap)).decode()))
    assert not [s for s in _samples(fams) if s.name in ("wattprint_device_power_watts",
                                                         "wattprint_attribution_lag_seconds")]
