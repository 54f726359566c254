"""The shipped operations configs: Prometheus rules (promtool), the Grafana dashboard, the Kubernetes manifest.

Every metric name the rules and the dashboard query must exist in a real exposition: a real Sidecar with
the simulated meter, fed synthetic engine steps over its ZeroMQ socket (as tests/test_sidecar_integration.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from wattprint.commands.sidecar import add_arguments as add_sidecar_arguments
from wattprint.exporters import http as wp_http
from wattprint.profiler.sidecar.daemon import Sidecar
from wattprint.profiler.transport import messages as transport

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "configs" / "prometheus"
RULES = PROM_DIR / "wattprint-rules.yaml"
RULES_TEST = PROM_DIR / "wattprint-rules.test.yaml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARD = ROOT / "configs" / "grafana" / "wattprint-dashboard.json"
K8S = ROOT / "configs" / "kubernetes" / "vllm-wattprint.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (make system-deps)")
DS_UID = "${DS_PROMETHEUS}"



# ------------------------------------------------------------------------------------------ helpers
from synthetic_engine import feed_steps  # noqa: E402


def _get(url: str, accept: str | None = None) -> str:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read().decode()


def exposition_index(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Sample names an OpenMetrics exposition declares (from ``# TYPE``, also for families without samples)
    and the label names seen on each sample name."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                "info": ("_info",), "summary": ("_sum", "_count", ""), "unknown": ("",), "stateset": ("",)}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            names.update(family + s for s in suffixes[kind.strip()])
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?", line)
            names.add(m.group(1))
            labels.setdefault(m.group(1), set()).update(re.findall(r'([a-zA-Z_]\w*)="', m.group(3) or ""))
    return names, labels


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "inf", "nan", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords, label names or strings)."""
    s = _STRINGS.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", "{}", s)
    s = re.sub(r"\[[^\]]*\]", "[]", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    out = set()
    for m in _IDENT.finditer(s):
        if m.group(0) in _KEYWORDS or s[m.end():].lstrip().startswith("("):
            continue
        out.add(m.group(0))
    return out


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every ``name{...}`` selector."""
    out = []
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        out.append((m.group(1), set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", m.group(2)))))
    return out


def load_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels") or [])  # collapsed rows hold their panels
    return out


def dashboard_exprs(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels(dash) for t in p.get("targets", []) if "expr" in t]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q.strip())
            assert m, f"variable {var['name']}: expected label_values(<selector>, <label>), got {q!r}"
            exprs.append(m.group(1))
    return exprs


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$model", ".*") \
        .replace("$stratum", ".*")


@pytest.fixture(scope="module")
def exposition():
    """OpenMetrics text of a real sidecar (simulated meter) after a few finished requests."""
    import zmq

    from wattprint.profiler.meters.simulated import SimulatedMeter

    tmp = tempfile.mkdtemp(prefix="wp-cfg-", dir="/tmp")  # short: unix socket paths are limited
    sc = Sidecar(SimulatedMeter("h100-sxm", n_devices=1, seed=0), socket_path=os.path.join(tmp, "wp.sock"),
                 metrics_port=0, window_s=0.3, advance_interval_s=0.05)
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        with sc:
            push.connect(sc.address)
            ids: list[str] = []
            t_end = time.monotonic() + 1.5
            feed_steps(push, lambda: time.monotonic() > t_end, ids)
            text = ""
            deadline = time.monotonic() + 40  # finals come ~30 windows after a request (the fit's lead)
            while time.monotonic() < deadline:
                text = _get(f"{sc.metrics_url}/metrics", "application/openmetrics-text")
                if "wattprint_requests_total{" in text and "wattprint_energy_per_output_token_joules_bucket{" in text:
                    break
                time.sleep(0.1)
            assert "wattprint_requests_total{" in text, text
            yield text
    finally:
        ctx.destroy(linger=0)  # closes the socket (unsent messages dropped), then terminates
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------- promtool
@pytest.mark.prometheus
@needs_promtool
def test_promtool_check_rules():
    r = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.prometheus
@needs_promtool
def test_promtool_unit_tests_pass():
    r = subprocess.run([PROMTOOL, "test", "rules", RULES_TEST.name], cwd=PROM_DIR, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


@pytest.mark.prometheus
@needs_promtool
def test_promtool_check_example_config():
    r = subprocess.run([PROMTOOL, "check", "config", PROM_CONFIG.name], cwd=PROM_DIR, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.prometheus
@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    """Each dashboard query, Grafana variables substituted, parses as PromQL (as a recording rule)."""
    exprs = [grafana_to_promql(e) for e in dashboard_exprs(load_dashboard())]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}:check", "expr": e}
                                                         for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------ rules
def test_rules_follow_conventions():
    rules = load_rules()
    records = [r["record"] for r in rules if "record" in r]
    alerts = [r for r in rules if "alert" in r]
    assert len(records) >= 10 and len(alerts) >= 5
    assert len(set(records)) == len(records)
    for name in records:  # level:metric:operations
        level, metric, ops = name.split(":")
        assert re.fullmatch(r"[a-z_]+", level) and re.fullmatch(r"[a-z0-9_]+", ops), name
        assert metric.startswith("wattprint_") and not metric.endswith("_total"), name
    for a in alerts:
        assert re.fullmatch(r"Wattprint[A-Za-z]+", a["alert"])
        assert a["labels"]["severity"] in ("warning", "critical")
        assert a["annotations"]["summary"] and a["annotations"]["description"]
    names = {a["alert"] for a in alerts}
    assert {"WattprintRecordsDropped", "WattprintAttributionLagHigh", "WattprintSidecarDown",
            "WattprintMetricsAbsent", "WattprintConservationDrift"} <= names


def test_unit_tests_exercise_every_rule():
    rules = load_rules()
    tests = yaml.safe_load(RULES_TEST.read_text())
    assert tests["rule_files"] == [RULES.name]
    exprs = " ".join(t["expr"] for case in tests["tests"] for t in case.get("promql_expr_test", []))
    for r in rules:
        if "record" in r:
            assert re.search(re.escape(r["record"]) + r"(?![\w:])", exprs), f"no promql_expr_test for {r['record']}"
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else silent).add(t["alertname"])
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert alerts <= firing, f"alerts never tested firing: {alerts - firing}"
    assert alerts <= silent, f"alerts never tested silent: {alerts - silent}"


def test_example_prometheus_config():
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    assert [(PROM_DIR / f).resolve() for f in cfg["rule_files"]] == [RULES.resolve()]
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "wattprint")
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
    assert "--enable-feature=exemplar-storage" in PROM_CONFIG.read_text()


# ------------------------------------------------------------------ metric names vs the real exposition
def test_exposition_fixture_is_real(exposition):
    names, labels = exposition_index(exposition)
    assert 'source="simulated"' in exposition
    # exemplars carry a keyed pseudonym of the request id (operators resolve it), never the id itself
    assert re.search(r'wattprint_request_energy_joules_bucket\{[^}]*\} \S+ # \{request_id="x[\w-]+"', exposition)
    assert 'request_id="req-' not in exposition
    assert {"model", "phase", "stratum"} <= labels["wattprint_energy_joules_total"]
    assert "wattprint_internal_errors_total" in names  # declared even before any error


def test_rules_reference_only_exported_metrics(exposition):
    names, labels = exposition_index(exposition)
    rules = load_rules()
    records = {r["record"] for r in rules if "record" in r}
    allowed = names | records | {"up"}
    for r in rules:
        used = metric_names(r["expr"])
        assert used, r
        assert used <= allowed, f"{r.get('record') or r.get('alert')}: unknown metrics {used - allowed}"
        for name, lbls in selector_labels(r["expr"]):
            if name in labels:
                assert lbls <= labels[name] | {"job", "instance"}, (name, lbls)


def test_dashboard_references_only_exported_metrics_and_rules(exposition):
    names, labels = exposition_index(exposition)
    records = {r["record"] for r in load_rules() if "record" in r}
    allowed = names | records | {"up"}
    for expr in dashboard_exprs(load_dashboard()):
        used = metric_names(expr)
        assert used, expr
        assert used <= allowed, f"{expr!r}: unknown metrics {used - allowed}"
        for name, lbls in selector_labels(expr):
            if name in labels:
                assert lbls <= labels[name] | {"job", "instance"}, (name, lbls)
            elif name in records:  # a recording rule keeps the labels of its level (and job)
                assert lbls <= set(name.split(":")[0].split("_")) | {"job"}, (name, lbls)


def test_every_exported_metric_is_used(exposition):
    """Rules and dashboard together show every wattprint family (nothing exported is forgotten)."""
    names, _ = exposition_index(exposition)
    used = set()
    for expr in [r["expr"] for r in load_rules()] + dashboard_exprs(load_dashboard()):
        used |= metric_names(expr)
    families = {re.sub(r"_(total|bucket|sum|count|info)$", "", n) for n in names}
    used_families = {re.sub(r"_(total|bucket|sum|count|info)$", "", n) for n in used}
    assert families <= used_families, f"exported but unused: {families - used_families}"


# -------------------------------------------------------------------------------------- dashboard
def test_dashboard_structure():
    dash = load_dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("model", "stratum"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == DS_UID
        assert v["includeAll"] and v["multi"] and v["allValue"] == ".*"
    panels = dashboard_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 10
    for p in graphs:
        assert p["title"] and p.get("description"), p["id"]
        assert p["datasource"] == {"type": "prometheus", "uid": DS_UID}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == DS_UID, p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
    # the panels the operator needs
    titles = " | ".join(p["title"].lower() for p in graphs)
    for needle in ("measured power per device", "attributed power by phase and stratum", "per output token",
                   "request energy", "kv-cache share", "tokens/s", "dropped", "attribution lag", "coefficients",
                   "measured vs simulated"):
        assert needle in titles, needle
    exprs = " ".join(t["expr"] for p in graphs for t in p["targets"])
    for needle in ('model=~"$model"', 'stratum=~"$stratum"', "instance:wattprint_idle_energy_joules:rate1m"):
        assert needle in exprs


def test_dashboard_heatmap_shows_exemplars():
    heat = [p for p in dashboard_panels(load_dashboard()) if p["type"] == "heatmap"]
    assert len(heat) == 1
    (t,) = heat[0]["targets"]
    assert "wattprint_request_energy_joules_bucket" in t["expr"] and "by (le)" in t["expr"]
    assert t["exemplar"] is True and t["format"] == "heatmap"
    assert heat[0]["options"]["calculate"] is False


def test_dashboard_labels_meter_source():
    panels = dashboard_panels(load_dashboard())
    src = next(p for p in panels if "wattprint_meter_info" in " ".join(t["expr"] for t in p.get("targets", []))
               and p["type"] == "table")
    assert "simulated" in src["title"].lower() and "measured" in src["title"].lower()
    mappings = json.dumps(src["fieldConfig"]["overrides"])
    assert "MEASURED" in mappings and "SIMULATED" in mappings and "ESTIMATED" in mappings


# ------------------------------------------------------------------------------------- kubernetes
def _k8s():
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    return docs, deployment, service


def _env(container) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_kubernetes_manifest_wiring():
    docs, deployment, service = _k8s()
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    containers = {c["name"]: c for c in spec["containers"]}
    vllm, sidecar = containers["vllm"], next(c for c in spec["containers"] if "sidecar" in c["command"])
    assert sidecar["command"][-2:] == ["wattprint", "sidecar"]

    # vLLM: the middleware, the two environment variables, the GPU
    args = vllm["args"]
    i = args.index("--middleware")
    middleware = args[i + 1]
    module, _, cls = middleware.rpartition(".")
    assert getattr(importlib.import_module(module), cls) is wp_http.WattprintMiddleware
    env = _env(vllm)
    assert set(env) >= {transport.ENV_SIDECAR, wp_http.ENV_ENERGY_URL}
    assert int(vllm["resources"]["limits"]["nvidia.com/gpu"]) >= 1

    # the sidecar's command line is valid for the real CLI
    sargs = add_sidecar_arguments(argparse.ArgumentParser()).parse_args(sidecar.get("args", []))
    assert sargs.metrics_port == 9464 and sargs.metrics_host == "0.0.0.0"
    assert sargs.socket == env[transport.ENV_SIDECAR]

    # one shared emptyDir holds the socket, mounted in both containers
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, (c["name"], m["name"])

    def mount_of(c, path):
        return next((m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")), None)

    mv, ms = mount_of(vllm, sargs.socket), mount_of(sidecar, sargs.socket)
    assert mv and ms and mv["name"] == ms["name"] and mv["mountPath"] == ms["mountPath"]
    assert "emptyDir" in volumes[mv["name"]]
    if sargs.ledger:
        assert mount_of(sidecar, sargs.ledger)
    # the socket is mode 0600: both containers must run as the same user
    users = {(c.get("securityContext") or {}).get("runAsUser", spec.get("securityContext", {}).get("runAsUser"))
             for c in spec["containers"]}
    assert len(users) == 1 and None not in users

    # metrics port, probes, Service with scrape annotations
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports["metrics"] == 9464
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    sport = next(p for p in service["spec"]["ports"] if p["port"] == 9464)
    assert sport["targetPort"] in ("metrics", 9464)
    ann = service["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "9464"
    # clients reach the sidecar through the Service
    energy_url = env[wp_http.ENV_ENERGY_URL]
    assert energy_url.startswith(f"http://{service['metadata']['name']}.") and energy_url.endswith(":9464")

    # image placeholders are obvious; the ServiceMonitor alternative is documented
    text = K8S.read_text()
    for c in spec["containers"]:
        assert c["image"].startswith("REPLACE_ME/"), c["image"]
    assert "# kind: ServiceMonitor" in text and "PLACEHOLDER" in text


# ------------------------------------------------------------------------------------------- docs
def test_operations_doc_points_at_existing_files():
    text = OPERATIONS.read_text()
    paths = set(re.findall(r"`((?:configs|docs)/[\w./-]+)`", text))
    assert {"configs/prometheus/wattprint-rules.yaml", "configs/grafana/wattprint-dashboard.json",
            "configs/kubernetes/vllm-wattprint.yaml"} <= paths
    for p in paths:
        assert (ROOT / p).exists(), p
    for needle in ("/v1/requests/", "X-Wattprint-Energy-Url", "exemplar-storage", "conservation", "idle"):
        assert needle in text, needle
