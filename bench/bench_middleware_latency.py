"""What the wattprint middleware adds to response latency under concurrent load.

A fake OpenAI-style ASGI app (reads the body, "generates" for ``--service-ms`` on average, answers a completion with
usage, or a stream of ``--chunks`` events) is called with and without
:class:`~wattprint.exporters.http.WattprintMiddleware` in front, ``--concurrency`` requests at a time on
one event loop, as vLLM's server runs them. The middleware does all its work: request id, signed URL,
stratum and policy (``--policy``), and the energy lookup at answer time, against a real wattprint sidecar
HTTP server in another process (``--sidecar up``; ``down``: nothing listens, the answers say
``unavailable``). Latency: from the request's arrival to its last body message. The variants alternate
round by round. Each request's overhead is its latency less the service time the fake app drew for it;
the added latency is the difference of the overhead percentiles (all rounds together).

    .venv/bin/python bench/bench_middleware_latency.py
    .venv/bin/python bench/bench_middleware_latency.py --stream --policy configs/policy.yaml
    .venv/bin/python bench/bench_middleware_latency.py --sidecar down

Prints a markdown summary (``--json PATH``: the raw figures).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEY = b"bench-url-key-0123456789abcdef01"

SIDECAR = r"""
import sys, threading
from prometheus_client import CollectorRegistry
from wattprint.exporters.api import MetricsServer, make_app
from wattprint.profiler.core.results import RequestResult
from wattprint.profiler.sidecar.httpapi import RequestAccess

def record(rid):
    return RequestResult(id=rid, energy_j=3.0, prefill_j=1.0, decode_j=2.0, kv_j=0.25, kv_read_bytes=0.0,
                         kv_write_bytes=0.0, prompt_tokens=8, output_tokens=16, flops=1e9, stratum="science",
                         source="simulated", status="provisional")

access = RequestAccess(sys.argv[2].encode(), None, lambda ref, rid: record(rid), record)
app = make_app(CollectorRegistry(), requests_fn=access)
server = MetricsServer(app, "127.0.0.1", int(sys.argv[1])).start()
print("ready", flush=True)
threading.Event().wait()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeOpenAI:
    """Answers /v1/completions like vLLM: JSON with usage, or SSE events ending in ``data: [DONE]``."""

    def __init__(self, service_s: float, chunks: int, seed: int = 0):
        self.service_s, self.chunks = service_s, chunks
        self.rng = random.Random(seed)

    def service(self) -> float:
        """A service time, uniform in [0.5, 1.5] x the mean (requests do not finish in lockstep)."""
        return self.service_s * (0.5 + self.rng.random())

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        req = json.loads(body)
        rid = "cmpl-" + (dict(scope["headers"]).get(b"x-request-id", b"x").decode())
        usage = {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24}
        service_s = self.service()
        scope["bench"]["service_s"] = service_s  # shared with the caller (the middleware copies scope shallowly)
        if not req.get("stream"):
            await asyncio.sleep(service_s)
            out = json.dumps({"id": rid, "object": "text_completion", "choices": [{"text": "x" * 64}],
                              "usage": usage}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
            await send({"type": "http.response.body", "body": out})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(self.chunks):
            await asyncio.sleep(service_s / self.chunks)
            chunk = {"id": rid, "choices": [{"text": "xyz"}], "usage": None}
            await send({"type": "http.response.body", "body": b"data: " + json.dumps(chunk).encode() + b"\n\n",
                        "more_body": True})
        if (req.get("stream_options") or {}).get("include_usage"):
            chunk = {"id": rid, "choices": [], "usage": usage}
            await send({"type": "http.response.body", "body": b"data: " + json.dumps(chunk).encode() + b"\n\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def one(app, body: bytes, headers) -> float:
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers,
             "query_string": b"", "http_version": "1.1", "scheme": "http", "bench": {}}
    sent = [False]

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    done = asyncio.get_running_loop().create_future()

    async def send(m):
        if m["type"] == "http.response.body" and not m.get("more_body") and not done.done():
            done.set_result(time.perf_counter())

    t0 = time.perf_counter()
    await app(scope, receive, send)
    latency = (await done) - t0
    return latency, latency - scope["bench"]["service_s"]


async def load(app, n: int, concurrency: int, body: bytes, headers) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    queue = iter(range(n))

    async def worker(k: int):
        await asyncio.sleep(0.05 * k / concurrency)  # staggered starts
        for _ in queue:
            out.append(await one(app, body, headers))

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per variant and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--service-ms", type=float, default=20.0, help="the fake engine's time per request")
    ap.add_argument("--stream", action="store_true", help="streaming completions")
    ap.add_argument("--include-usage", action="store_true", help="with --stream: stream_options.include_usage")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--policy", default=None, help="policy YAML for the middleware (default: none)")
    ap.add_argument("--sidecar", choices=("up", "down"), default="up")
    ap.add_argument("--no-energy", action="store_true", help="no energy in the answer (no sidecar lookup)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    port = free_port()
    sidecar = None
    if args.sidecar == "up":
        sidecar = subprocess.Popen([sys.executable, "-c", SIDECAR, str(port), KEY.decode()], stdout=subprocess.PIPE,
                                   cwd=REPO)
        assert sidecar.stdout.readline().strip() == b"ready"
    stats_dir = tempfile.mkdtemp(prefix="wattprint-bench-")
    if args.no_energy:
        os.environ["WATTPRINT_ANSWER_ENERGY"] = "0"
    if args.policy:
        os.environ.update(WATTPRINT_POLICY=args.policy, WATTPRINT_POLICY_STATS_DIR=stats_dir)
    from wattprint.exporters.http import WattprintMiddleware

    fake = FakeOpenAI(args.service_ms / 1000, args.chunks)
    wrapped = WattprintMiddleware(fake, energy_base_url=f"http://127.0.0.1:{port}", url_key=KEY)
    req = {"model": "m", "prompt": "hello", "max_tokens": 16, "stream": args.stream}
    if args.include_usage:
        req["stream_options"] = {"include_usage": True}
    body = json.dumps(req).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-wattprint-stratum", b"agentic"), (b"authorization", b"Bearer sk-bench")]
    lat = {"bare": [], "middleware": []}
    try:
        asyncio.run(load(wrapped, 200, args.concurrency, body, headers))  # warm-up
        for r in range(args.rounds):
            order = ("bare", "middleware") if r % 2 == 0 else ("middleware", "bare")
            for name in order:
                app = fake if name == "bare" else wrapped
                lat[name] += asyncio.run(load(app, args.requests, args.concurrency, body, headers))
    finally:
        if sidecar is not None:
            sidecar.kill()
            sidecar.wait()
    pct, over = {}, {}
    for name, v in lat.items():
        a = np.array(v) * 1000
        pct[name] = {p: float(np.percentile(a[:, 0], p)) for p in (50, 90, 99)}
        over[name] = {p: float(np.percentile(a[:, 1], p)) for p in (50, 90, 99)}
    added = {p: over["middleware"][p] - over["bare"][p] for p in (50, 90, 99)}
    cmd = " ".join(["bench/bench_middleware_latency.py", *sys.argv[1:]])
    print(f"{dt.date.today()} · {platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()}) · `{cmd}`\n")
    print(f"{'streaming' if args.stream else 'non-streaming'}, concurrency {args.concurrency}, service "
          f"{args.service_ms:g} ms (uniform 0.5-1.5x), sidecar {args.sidecar}{', no energy lookup' if args.no_energy else ''}, policy {args.policy or 'none'}, "
          f"{args.rounds} rounds x {args.requests} requests per variant\n")
    print("| variant | latency p50 ms | p90 | p99 | overhead (latency - service) p50 ms | p90 | p99 |")
    print("|---|---|---|---|---|---|---|")
    for name in ("bare", "middleware"):
        print(f"| {name} | {pct[name][50]:.3f} | {pct[name][90]:.3f} | {pct[name][99]:.3f} | "
              f"{over[name][50]:.3f} | {over[name][90]:.3f} | {over[name][99]:.3f} |")
    print(f"| **added by the middleware** | | | | {added[50]:.3f} | {added[90]:.3f} | {added[99]:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"latency_ms": pct, "overhead_ms": over, "added_ms": added,
                                               "args": vars(args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
