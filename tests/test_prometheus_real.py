"""A real Prometheus scrapes a real sidecar (simulated meter) fed engine steps over its ZeroMQ socket.

Prometheus (Debian's binary) runs on loopback with a 1 s scrape and rule evaluation interval, exemplar
storage on, and configs/prometheus/wattprint-rules.yaml loaded. After a few seconds of traffic its HTTP
API must show: conservation on the stored samples of every scrape, recording rules evaluated without
error, request-id exemplars on the request-energy histogram, and no request id in any label value.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from wattprint.profiler.sidecar.daemon import Sidecar

pytestmark = pytest.mark.prometheus

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "configs" / "prometheus" / "wattprint-rules.yaml"
DASHBOARD = ROOT / "configs" / "grafana" / "wattprint-dashboard.json"
PROMETHEUS = shutil.which("prometheus")

from synthetic_engine import feed_steps  # noqa: E402

ENERGY_METRICS = ("wattprint_device_energy_joules_total", "wattprint_energy_joules_total",
                  "wattprint_idle_energy_joules_total")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromAPI:
    def __init__(self, base: str):
        self.base = base

    def get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.base}{path}?{query}", timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, t: float | None = None) -> dict:
        return self.get("/api/v1/query", query=expr, **({"time": f"{t:.3f}"} if t is not None else {}))


def _wait(pred, timeout_s: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    last_exc = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode} while waiting for {what}:\n{log.read_text()[-3000:]}")
        try:
            if pred():
                return
        except (OSError, ValueError, KeyError, IndexError, AssertionError) as exc:  # not up yet / no data yet
            last_exc = exc
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what} (last error: {last_exc!r})\n{log.read_text()[-3000:]}")


@pytest.mark.timeout(90)
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (make system-deps)")
def test_real_prometheus_scrapes_real_sidecar():
    import zmq

    from wattprint.profiler.meters.simulated import SimulatedMeter

    t_test = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="wp-prom-", dir="/tmp"))  # short: unix socket paths are limited
    meter = SimulatedMeter("h100-sxm", n_devices=1, seed=0)
    sc = Sidecar(meter, socket_path=str(tmp / "wp.sock"), metrics_port=0, window_s=0.5, advance_interval_s=0.05)
    ctx = zmq.Context()
    stop = threading.Event()
    ids: list[str] = []
    feeder = None
    proc = None
    log = tmp / "prometheus.log"
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        sc.start()
        push.connect(sc.address)
        feeder = threading.Thread(target=feed_steps, args=(push, stop.is_set, ids), daemon=True)
        feeder.start()
        target = sc.metrics_url.split("://", 1)[1]
        assert target.startswith("127.0.0.1:")

        port = _free_port()
        cfg = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "wattprint", "static_configs": [{"targets": [target]}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        t_wall0 = time.time()
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage",
                 "--log.level=info"],
                stdout=logf, stderr=subprocess.STDOUT, cwd=tmp)
        api = PromAPI(f"http://127.0.0.1:{port}")

        def ready():
            with urllib.request.urlopen(f"{api.base}/-/ready", timeout=2) as r:
                return r.status == 200

        _wait(ready, 20, "/-/ready", proc, log)

        def exemplars():
            return api.get("/api/v1/query_exemplars", query="wattprint_request_energy_joules_bucket",
                           start=f"{t_wall0 - 60:.3f}", end=f"{time.time() + 60:.3f}")

        def enough_data():
            up = api.query('up{job="wattprint"}')["result"]
            assert up and up[0]["value"][1] == "1"
            # two+ scrapes with finished requests, recording rules evaluated, exemplars stored
            assert api.query("count_over_time(wattprint_requests_total[1m])")["result"]
            # three+ scrapes with metered energy (under load the first settlement may come late)
            assert float(api.query("min(count_over_time(wattprint_device_energy_joules_total[1m]))")["result"][0]
                         ["value"][1]) >= 3
            assert conservation_checked()[0] >= 3  # under load the first settlement may come late
            assert api.query("instance_device:wattprint_device_energy_joules:rate1m > 0")["result"]
            assert api.query("instance:wattprint_conservation_error:ratio")["result"]
            assert api.query("model_stratum:wattprint_energy_joules_per_output_tokens:ratio_rate5m")["result"]
            return bool(exemplars())

        def conservation_checked() -> tuple[int, dict]:
            """Conservation on the stored samples, scrape by scrape (one scrape = one timestamp)."""
            selector = '{__name__=~"' + "|".join(ENERGY_METRICS) + '", job="wattprint"}[2m]'
            by_ts: dict[float, dict[str, float]] = defaultdict(lambda: defaultdict(float))
            for series in api.query(selector, time.time())["result"]:
                name = series["metric"]["__name__"]
                for ts, value in series["values"]:
                    by_ts[float(ts)][name] += float(value)
            checked = 0
            for ts, sums in sorted(by_ts.items()):
                measured = sums.get("wattprint_device_energy_joules_total")
                if not measured:
                    assert not sums.get("wattprint_energy_joules_total"), (ts, dict(sums))
                    continue  # before the first Hello: no device energy yet
                assert "wattprint_idle_energy_joules_total" in sums, (ts, dict(sums))
                attributed = sums.get("wattprint_energy_joules_total", 0.0)
                idle = sums["wattprint_idle_energy_joules_total"]
                assert abs(attributed + idle - measured) <= 1e-6 * measured, (ts, attributed, idle, measured)
                checked += 1
            return checked, by_ts

        _wait(enough_data, 90, "scraped data, recording rules and exemplars", proc, log)
        checked, by_ts = conservation_checked()
        assert checked >= 3, dict(by_ts)
        assert max(sums.get("wattprint_energy_joules_total", 0.0) for sums in by_ts.values()) > 0

        # --- recording rules: all loaded, evaluated without error; conservation rule ~0; no drift alert
        rules = [r for g in api.get("/api/v1/rules")["groups"] for r in g["rules"]]
        shipped = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == {r.get("record") or r.get("alert") for r in shipped}
        for r in rules:
            assert r["health"] == "ok", r
        err = api.query("max(instance:wattprint_conservation_error:ratio)")["result"]
        assert float(err[0]["value"][1]) <= 1e-6, err
        power = api.query("instance:wattprint_device_energy_joules:rate1m")["result"]
        assert power and float(power[0]["value"][1]) > 0
        alerts = api.get("/api/v1/alerts")["alerts"]
        assert not [a for a in alerts if a["labels"]["alertname"] in (
            "WattprintConservationDrift", "WattprintSidecarDown", "WattprintRecordsDropped",
            "WattprintInternalErrors")], alerts

        # --- every dashboard query (variables at "All") runs; all but the error counters return data (a
        # 5-minute ratio needs its counters in two scrapes: waited for, as a dashboard user would)
        dash = json.loads(DASHBOARD.read_text())
        panels = [p for row in dash["panels"] for p in [row, *row.get("panels", [])]]

        def panels_answer() -> bool:
            for p in panels:
                for t in p.get("targets", []):
                    expr = (t["expr"].replace("$__rate_interval", "1m").replace("$model", ".*")
                            .replace("$stratum", ".*"))
                    result = api.query(expr)["result"]
                    if "wattprint_internal_errors_total" not in expr:  # absent until an error happens
                        assert result, (p["title"], expr)
            return True

        _wait(panels_answer, 20, "every dashboard query answering", proc, log)

        # --- exemplars carry keyed pseudonyms of requests we sent (the operator resolves them), never ids
        known = set(ids)
        ex = exemplars()
        seen = set()
        for group in ex:
            assert group["seriesLabels"]["__name__"] == "wattprint_request_energy_joules_bucket"
            assert "request_id" not in group["seriesLabels"]
            for e in group["exemplars"]:
                seen.add(e["labels"]["request_id"])
                assert float(e["value"]) > 0
        assert seen and not seen & known
        resolved = [sc.lookup(x) for x in seen]
        assert None not in resolved and {r.id for r in resolved} <= known, resolved

        # --- no request id is ever a label value
        series = api.get("/api/v1/series", **{"match[]": ['{__name__=~".+"}'], "start": f"{t_wall0 - 60:.3f}",
                                              "end": f"{time.time() + 60:.3f}"})
        assert any(s["__name__"] == "wattprint_request_energy_joules_bucket" for s in series)
        for s in series:
            for label, value in s.items():
                assert value not in known and "req-" not in value, (label, value, s)

        # --- stop Prometheus cleanly
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()[-3000:]
        assert time.monotonic() - t_test < 60
    finally:
        stop.set()
        if feeder is not None:
            feeder.join(timeout=5)
        ctx.destroy(linger=0)  # closes the socket (unsent messages dropped), then terminates
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        sc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
