"""What the wattprint middleware adds to response latency under concurrent load.

A fake OpenAI-style ASGI app (reads the body, "generates" for ``--service-ms`` on average, answers a completion with
usage, or a stream of ``--chunks`` events) is called with and without
:class:`~wattprint.exporters.http.WattprintMiddleware` in front, ``--concurrency`` requests at a time on
one event loop, as vLLM's server runs them. The middleware does all its work: request id, signed URL,
stratum and policy (``--policy``), and the energy lookup at answer time, configured as ``wattprint serve``
configures it (environment), against the real sidecar lookup servers in another process: the lookup socket
(:mod:`wattprint.profiler.sidecar.lookup`, ZeroMQ) and the HTTP API (:mod:`wattprint.exporters.api`), both
checking the signed credential (``RequestAccess``) under a lock, over a store that has a provisional record for
every request (``--sidecar down``: nothing listens, the answers say ``unavailable``).

Variants (``--lookup``, comma-separated): ``zmq`` (the lookup socket, HTTP as fallback), ``http`` (the HTTP API
only), ``none`` (the middleware without energy in the answer); ``bare`` (no middleware) always. They alternate round by round in one event loop. Latency: from the
request's arrival to its last body message; each request's overhead is its latency less the service time the
fake app drew for it; the added latency is the difference of the overhead percentiles, per round (a variant's round
and bare's run side by side), median of the rounds; also pooled (all rounds together).
CPU: this process's CPU time per request (middleware, client, fake app) and the sidecar process's.

    .venv/bin/python bench/bench_middleware_latency.py --service-ms 200 --requests 1000 --lookup zmq,http
    .venv/bin/python bench/bench_middleware_latency.py --service-ms 1000 --requests 300
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
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEY = b"bench-url-key-0123456789abcdef01"

SIDECAR = r"""
import sys, threading
from prometheus_client import CollectorRegistry
from wattprint.exporters.api import MetricsServer, make_app
from wattprint.profiler.core.results import RequestResult
from wattprint.profiler.sidecar.httpapi import RequestAccess
from wattprint.profiler.sidecar.lookup import LookupServer
from wattprint.profiler.sidecar.stats import Counters

lock = threading.RLock()

def record(rid):
    with lock:
        return RequestResult(id=rid, energy_j=3.0, prefill_j=1.0, decode_j=2.0, kv_j=0.25, kv_read_bytes=0.0,
                             kv_write_bytes=0.0, prompt_tokens=8, output_tokens=16, flops=1e9, stratum="science",
                             source="simulated", status="provisional")

access = RequestAccess(sys.argv[2].encode(), None, lambda ref, rid: record(rid), record)
server = MetricsServer(make_app(CollectorRegistry(), requests_fn=access), "127.0.0.1", int(sys.argv[1])).start()
lookups = LookupServer(sys.argv[3], access, lock, Counters()).bind().start()
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


async def one(app, body: bytes, headers, statuses: dict) -> tuple[float, float]:
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers,
             "query_string": b"", "http_version": "1.1", "scheme": "http", "bench": {}}
    sent = [False]
    last = []

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    done = asyncio.get_running_loop().create_future()

    async def send(m):
        if m["type"] == "http.response.start":
            last.append(dict(m.get("headers") or []).get(b"x-wattprint-energy-status", b"none").decode())
        if m["type"] == "http.response.body" and not m.get("more_body") and not done.done():
            done.set_result(time.perf_counter())

    t0 = time.perf_counter()
    await app(scope, receive, send)
    latency = (await done) - t0
    if last:
        statuses[last[0]] = statuses.get(last[0], 0) + 1
    return latency, latency - scope["bench"]["service_s"]


async def load(app, n: int, concurrency: int, body: bytes, headers, statuses: dict) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    queue = iter(range(n))

    async def worker(k: int):
        await asyncio.sleep(0.05 * k / concurrency)  # staggered starts
        for _ in queue:
            out.append(await one(app, body, headers, statuses))

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return out


def middleware(fake, kind: str, port: int, lookup_addr: str):
    """The middleware as ``wattprint serve`` configures it (environment), with the lookup ``kind``."""
    from wattprint.exporters.http import WattprintMiddleware

    os.environ.update(WATTPRINT_LOOKUP=lookup_addr if kind == "zmq" else "http",
                      WATTPRINT_SIDECAR_URL=f"http://127.0.0.1:{port}",
                      WATTPRINT_ANSWER_ENERGY="0" if kind == "none" else "1")
    return WattprintMiddleware(fake, energy_base_url=f"http://127.0.0.1:{port}", url_key=KEY)


def cpu_s(proc) -> float:
    if proc is None:
        return 0.0
    t = psutil.Process(proc.pid).cpu_times()
    return t.user + t.system


async def run_all(args, apps: dict, body: bytes, headers, sidecar) -> tuple[dict, dict, dict]:
    lat = {name: [] for name in apps}  # one list of (latency, overhead) per round
    cpu = {name: [0.0, 0.0] for name in apps}  # this process, the sidecar
    statuses = {name: {} for name in apps}
    for name, app in apps.items():  # warm-up
        if name != "bare":
            await load(app, 200, args.concurrency, body, headers, {})
    names = list(apps)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            c0, s0 = time.process_time(), cpu_s(sidecar)
            lat[name].append(await load(apps[name], args.requests, args.concurrency, body, headers, statuses[name]))
            cpu[name][0] += time.process_time() - c0
            cpu[name][1] += cpu_s(sidecar) - s0
    return lat, cpu, statuses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="requests per variant and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--service-ms", type=float, default=200.0, help="the fake engine's time per request")
    ap.add_argument("--stream", action="store_true", help="streaming completions")
    ap.add_argument("--include-usage", action="store_true", help="with --stream: stream_options.include_usage")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--policy", default=None, help="policy YAML for the middleware (default: none)")
    ap.add_argument("--sidecar", choices=("up", "down"), default="up")
    ap.add_argument("--lookup", default="zmq", help="middleware variants, comma-separated: zmq, http (the lookup), "
                    "none (no energy in the answer) (default zmq)")
    ap.add_argument("--no-energy", action="store_true", help="no energy in the answer (no sidecar lookup)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    kinds = ["none"] if args.no_energy else [k.strip() for k in args.lookup.split(",") if k.strip()]
    if not set(kinds) <= {"zmq", "http", "none"}:
        ap.error("--lookup takes zmq, http, none")

    port = free_port()
    run_dir = tempfile.mkdtemp(prefix="wattprint-bench-")  # 0700: the lookup socket's private directory
    lookup_addr = f"ipc://{run_dir}/sidecar.sock.lookup"
    sidecar = None
    if args.sidecar == "up":
        sidecar = subprocess.Popen([sys.executable, "-c", SIDECAR, str(port), KEY.decode(), lookup_addr],
                                   stdout=subprocess.PIPE, cwd=REPO)
        assert sidecar.stdout.readline().strip() == b"ready"
    if args.policy:
        os.environ.update(WATTPRINT_POLICY=args.policy, WATTPRINT_POLICY_STATS_DIR=run_dir)

    fake = FakeOpenAI(args.service_ms / 1000, args.chunks)
    apps = {"bare": fake, **{f"middleware ({k})": middleware(fake, k, port, lookup_addr) for k in kinds}}
    req = {"model": "m", "prompt": "hello", "max_tokens": 16, "stream": args.stream}
    if args.include_usage:
        req["stream_options"] = {"include_usage": True}
    body = json.dumps(req).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-wattprint-stratum", b"agentic"), (b"authorization", b"Bearer sk-bench")]
    try:
        lat, cpu, statuses = asyncio.run(run_all(args, apps, body, headers, sidecar))
    finally:
        if sidecar is not None:
            sidecar.kill()
            sidecar.wait()
    n = args.rounds * args.requests
    pct, over, added, pooled = {}, {}, {}, {}
    for name, rounds in lat.items():
        a = np.array([x for r in rounds for x in r]) * 1000
        pct[name] = {p: float(np.percentile(a[:, 0], p)) for p in (50, 90, 99)}
        over[name] = {p: float(np.percentile(a[:, 1], p)) for p in (50, 90, 99)}
        # per round (bare and this variant ran side by side): the overhead percentiles' difference
        per_round = [{p: float(np.percentile(np.array(r)[:, 1] * 1000, p) - np.percentile(np.array(b)[:, 1] * 1000, p))
                      for p in (50, 90, 99)} for r, b in zip(rounds, lat["bare"])]
        added[name] = {p: float(np.median([r[p] for r in per_round])) for p in (50, 90, 99)}
        pooled[name] = {p: over[name][p] - over["bare"][p] for p in (50, 90, 99)}
    cmd = " ".join(["bench/bench_middleware_latency.py", *sys.argv[1:]])
    print(f"{dt.date.today()} · {platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()}) · `{cmd}`\n")
    print(f"{'streaming' if args.stream else 'non-streaming'}, concurrency {args.concurrency}, service "
          f"{args.service_ms:g} ms (uniform 0.5-1.5x, ~{args.concurrency / args.service_ms * 1000:.0f} req/s), "
          f"sidecar {args.sidecar}, policy {args.policy or 'none'}, {args.rounds} rounds x {args.requests} "
          "requests per variant, alternating\n")
    print("Added = the variant's overhead percentile less bare's, per round, median of the rounds (pooled: all "
          "rounds together, which a stall of the shared machine in one round can swing).\n")
    print("| variant | latency p50 ms | p90 | p99 | added p50 ms | added p90 | added p99 | pooled added p99 | "
          "p99 ratio | CPU ms/request (server) | (sidecar) | energy status |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in lat:
        st = ", ".join(f"{k} {v}" for k, v in sorted(statuses[name].items())) or "-"
        print(f"| {name} | {pct[name][50]:.2f} | {pct[name][90]:.2f} | {pct[name][99]:.2f} | "
              f"{added[name][50]:.3f} | {added[name][90]:.3f} | {added[name][99]:.3f} | {pooled[name][99]:.3f} | "
              f"{pct[name][99] / pct['bare'][99]:.4f} | {cpu[name][0] / n * 1000:.3f} | "
              f"{cpu[name][1] / n * 1000:.3f} | {st} |")
    for name, app in apps.items():
        if getattr(app, "lookup", None) is not None:
            print(f"\n{name} lookup counts: {app.lookup.counts}")
    if args.json:
        Path(args.json).write_text(json.dumps({"latency_ms": pct, "overhead_ms": over, "added_ms": added,
                                               "pooled_added_ms": pooled,
                                               "cpu_s": cpu, "statuses": statuses, "args": vars(args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
