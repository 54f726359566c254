"""The middleware's lookup of a request's energy at the sidecar, without blocking the event loop.

Each lookup is one ``GET`` (stdlib ``http.client``) on a small pool of threads, awaited with a timeout;
at most ``max_in_flight`` run at once (more are answered None at once). After ``trip_after`` failures
in a row (refused, timed out, 5xx) lookups stop for ``cooldown_s``, then one is tried again: a sidecar
that is down or hung costs the server nothing but a dictionary lookup.

``wait_s`` (default 0): how long a lookup may keep asking while the sidecar has not yet seen all of the
request's output tokens (its last steps still on their way), at most every ``retry_s``. It never waits
for the energy counter: the figure at answer time is the provisional one.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

ENV_TIMEOUT_MS = "WATTPRINT_ENERGY_TIMEOUT_MS"
ENV_WAIT_MS = "WATTPRINT_ENERGY_WAIT_MS"
MAX_RECORD_BYTES = 64 << 10


class _NotYet(Exception):
    pass


class EnergyLookup:
    def __init__(self, base_url: str, *, timeout_s: float = 0.05, wait_s: float = 0.0, retry_s: float = 0.005,
                 max_in_flight: int = 32, workers: int = 4, trip_after: int = 3, cooldown_s: float = 1.0):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "") or not parts.hostname:
            raise ValueError(f"the sidecar's lookup URL must be http://host:port, got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout_s, self.wait_s, self.retry_s = float(timeout_s), float(wait_s), float(retry_s)
        self.max_in_flight, self.trip_after, self.cooldown_s = max_in_flight, trip_after, cooldown_s
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="wattprint-energy")
        self._in_flight = 0
        self._failures = 0
        self._closed_until = 0.0
        #: lookups by outcome (ok, missing, skipped, failed)
        self.counts = {"ok": 0, "missing": 0, "skipped": 0, "failed": 0}

    def _get(self, path: str) -> dict | None:
        """One GET (in a pool thread): the record, None for 404; raises on anything else."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            conn.request("GET", path, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read(MAX_RECORD_BYTES + 1)
            if resp.status == 404:
                return None
            if resp.status != 200 or len(body) > MAX_RECORD_BYTES:
                raise OSError(f"sidecar answered {resp.status}")
            record = json.loads(body)
            return record if isinstance(record, dict) else None
        finally:
            conn.close()

    def _open(self) -> bool:
        return self._failures < self.trip_after or time.monotonic() >= self._closed_until

    def _failed(self) -> None:
        self._failures += 1
        self.counts["failed"] += 1
        if self._failures >= self.trip_after:
            self._closed_until = time.monotonic() + self.cooldown_s

    async def record(self, path: str, output_tokens: int | None = None) -> dict | None:
        """The sidecar's record for ``path`` (``/v1/requests/<id>?ref=..&sig=..``), or None."""
        if not self._open() or self._in_flight >= self.max_in_flight:
            self.counts["skipped"] += 1
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        best = None
        while True:
            self._in_flight += 1
            try:
                rec = await asyncio.wait_for(loop.run_in_executor(self._pool, self._get, path), self.timeout_s)
            except (OSError, ValueError, asyncio.TimeoutError, http.client.HTTPException):
                self._failed()
                return best
            finally:
                self._in_flight -= 1
            self._failures = 0
            if rec is not None:
                best = rec
            complete = rec is not None and (rec.get("status") == "final" or output_tokens is None
                                            or _tokens(rec) >= output_tokens)
            if complete or loop.time() + self.retry_s > deadline:
                self.counts["ok" if best is not None else "missing"] += 1
                return best
            await asyncio.sleep(self.retry_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _tokens(rec: dict) -> int:
    n = rec.get("output_tokens")
    return n if isinstance(n, int) else 0
