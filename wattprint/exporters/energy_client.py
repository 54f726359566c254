"""The middleware's lookup of a request's energy at the sidecar, without blocking the event loop.

:class:`Lookup` holds what every way of asking shares: at most ``max_in_flight`` questions at once (more
are answered None at once, counted ``skipped``); each bounded by ``timeout_s``; after ``trip_after``
failures in a row (refused, timed out, 5xx) no question is asked for ``cooldown_s``, then one is tried
again: a sidecar that is down or hung costs the server nothing but a dictionary lookup. Outcomes are
counted in ``counts`` (ok, missing, skipped, failed).

``wait_s`` (default 0): how long a lookup may keep asking while the sidecar has not yet seen all of the
request's output tokens (its last steps still on their way), at most every ``retry_s``. It never waits
for the energy counter: the figure at answer time is the provisional one.

Two ways of asking:

* :class:`~wattprint.exporters.energy_zmq.ZmqLookup` (the default when the sidecar's step socket is a
  private ``ipc://`` one): ZeroMQ in the server's event loop, to the sidecar's lookup socket
  (:mod:`wattprint.profiler.sidecar.lookup`); no thread, no connection per answer;
* :class:`EnergyLookup`: one ``GET`` of the signed URL's path (stdlib ``http.client``) on a small pool of
  threads, the fallback (and the way when the sidecar has only its HTTP API).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from wattprint.profiler.sidecar import access

log = logging.getLogger(__name__)

ENV_TIMEOUT_MS = "WATTPRINT_ENERGY_TIMEOUT_MS"
ENV_WAIT_MS = "WATTPRINT_ENERGY_WAIT_MS"
MAX_RECORD_BYTES = 64 << 10


class Lookup:
    """The shared part (see the module docstring); a subclass gives :meth:`ask`."""

    def __init__(self, *, timeout_s: float = 0.05, wait_s: float = 0.0, retry_s: float = 0.005,
                 max_in_flight: int = 32, trip_after: int = 3, cooldown_s: float = 1.0):
        self.timeout_s, self.wait_s, self.retry_s = float(timeout_s), float(wait_s), float(retry_s)
        if not (self.timeout_s > 0 and self.wait_s >= 0 and self.retry_s > 0):
            raise ValueError("the lookup's timeout and retry interval must be positive, its wait not negative")
        self.max_in_flight, self.trip_after, self.cooldown_s = max_in_flight, trip_after, cooldown_s
        self._in_flight = 0
        self._failures = 0
        self._closed_until = 0.0
        #: lookups by outcome (ok, missing, skipped, failed)
        self.counts = {"ok": 0, "missing": 0, "skipped": 0, "failed": 0}

    async def ask(self, response_id: str, ref: str, sig: str) -> dict | None:
        """One question, at most ``timeout_s``: the record, None when unknown; OSError when it failed."""
        raise NotImplementedError

    def _open(self) -> bool:
        return self._failures < self.trip_after or time.monotonic() >= self._closed_until

    def _failed(self) -> None:
        self._failures += 1
        self.counts["failed"] += 1
        if self._failures >= self.trip_after:
            self._closed_until = time.monotonic() + self.cooldown_s

    async def record(self, response_id: str, ref: str, sig: str, output_tokens: int | None = None) -> dict | None:
        """The sidecar's record of the request the middleware gave ``ref`` (signed ``sig``), or None."""
        if not self._open() or self._in_flight >= self.max_in_flight:
            self.counts["skipped"] += 1
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        best = None
        while True:
            self._in_flight += 1
            try:
                rec = await self.ask(response_id, ref, sig)
            except (OSError, asyncio.TimeoutError):
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
        pass


class EnergyLookup(Lookup):
    """Questions as ``GET <base_url>/v1/requests/<id>?ref=..&sig=..`` on ``workers`` threads."""

    def __init__(self, base_url: str, *, workers: int = 4, **kwargs):
        super().__init__(**kwargs)
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "") or not parts.hostname:
            raise ValueError(f"the sidecar's lookup URL must be http://host:port, got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="wattprint-energy")

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
        except (http.client.HTTPException, ValueError) as exc:
            raise OSError(f"bad answer from the sidecar: {exc}") from exc
        finally:
            conn.close()

    async def ask(self, response_id: str, ref: str, sig: str) -> dict | None:
        loop = asyncio.get_running_loop()
        path = access.request_path(response_id, ref, sig)
        return await asyncio.wait_for(loop.run_in_executor(self._pool, self._get, path), self.timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _tokens(rec: dict) -> int:
    n = rec.get("output_tokens")
    return n if isinstance(n, int) else 0
