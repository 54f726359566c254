"""The sidecar's HTTP API fuzzed with schemathesis against its own OpenAPI description (/openapi.json):
no input makes it answer with a server error, and every answer conforms to the description."""

from __future__ import annotations

import json
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from test_sidecar import OPERATOR, ManualTimeline, _hello, _sidecar, _step  # noqa: E402

from wattprint.profiler.core.records import RequestEntry  # noqa: E402
from wattprint.profiler.transport import messages as transport  # noqa: E402


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    d = tmp_path_factory.mktemp("fz")
    sc = _sidecar(str(d / "wp.sock")).start()
    sc._process([(_hello(), 0.0, False)])
    ManualTimeline.instances[-1].push(100.0, (0.0, 0.0))
    sc._process([(transport.Steps(pid=4242, records=[
        _step(1, [RequestEntry("chatcmpl-x-0a0a0a0a", 4, 0, 0, finished=True), RequestEntry("cmpl-y-0-1b1b1b1b", 2, 0, 0)])
    ]), 0.0, False)])
    sc.driver.advance(150.0)
    yield sc
    sc.stop()


def _schema(sc):
    return schemathesis.openapi.from_wsgi("/openapi.json", sc.app)


def test_openapi_served_and_complete(sidecar):
    import urllib.request

    with urllib.request.urlopen(f"{sidecar.metrics_url}/openapi.json", timeout=5) as r:
        spec = json.loads(r.read())
    assert spec["openapi"].startswith("3.1") and set(spec["paths"]) == {"/metrics", "/healthz", "/openapi.json",
                                                                        "/v1/requests/{id}"}


@pytest.mark.parametrize("operator", [False, True], ids=["anonymous", "operator"])
def test_api_fuzz_no_server_error(sidecar, operator):
    schema = _schema(sidecar)
    headers = {"Authorization": f"Bearer {OPERATOR}"} if operator else {}
    failures = []
    from hypothesis import given

    for op in schema.get_all_operations():
        operation = op.ok()
        strategy = operation.as_strategy()

        @given(strategy)
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            ManualTimeline.instances[-1].push(time.monotonic(), (1.0, 1.0))  # a fresh reading: healthy
            response = case.call(headers=headers)
            if response.status_code >= 500:
                failures.append((case.path, case.path_parameters, case.query, response.status_code))
            case.validate_response(response)

        check()
    assert not failures
