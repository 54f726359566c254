"""What the sidecar shows: one metrics snapshot per scrape, request records, health (part of
:class:`~wattprint.profiler.sidecar.daemon.Sidecar`, a mixin over its state)."""

from __future__ import annotations

import time

from wattprint.exporters.prometheus import MetricsSnapshot
from wattprint.profiler.core.results import RequestResult


class Views:
    """The read side of the sidecar."""

    def snapshot(self) -> MetricsSnapshot:
        """Everything a scrape exports, at one instant (the attributor's totals under the lock)."""
        with self.lock:
            model_totals, coefficients = self.driver.totals()
            requests, hist_energy, hist_token = self.histograms.copy()
            steps, lag = self.driver.steps, self.driver.lag_s
        oldest = self.queue.oldest_t()
        if oldest is not None:  # records received and not yet read: the backlog
            lag = max(lag or 0.0, time.monotonic() - oldest)
        dropped = self.stats.dropped()
        if self.ledger is not None and self.ledger.lost_lines:
            dropped["ledger_lost"] = self.ledger.lost_lines
        return MetricsSnapshot(
            source=self.source, device_names=list(self.device_names), device_power_w=self.power.power_w(),
            model_totals=model_totals, coefficients=coefficients, requests=requests,
            request_energy=hist_energy, energy_per_token=hist_token, steps=steps, dropped=dropped,
            internal_errors=self.stats.errors(), lag_s=lag,
        )

    def lookup(self, rid: str) -> RequestResult | None:
        """(Operators) a request's result: final if settled, provisional while in flight, None if unknown.

        Accepts the engine's request id, the OpenAI response id (``chatcmpl-...``/``cmpl-...``) or an
        exemplar reference; several engine requests answering to one name get their sum.
        """
        with self.lock:
            return self.results.lookup(rid, self.driver.provisional)

    def lookup_ref(self, ref: str, response_id: str) -> RequestResult | None:
        """(Clients) the record of the one request the middleware gave reference ``ref``."""
        with self.lock:
            return self.results.lookup_ref(ref, response_id, self.driver.provisional)

    def health(self) -> tuple[bool, dict]:
        now = time.monotonic()
        last = self.power.last_t_s
        threads_ok = self.receiver.is_alive() and self._worker is not None and self._worker.is_alive()
        meter_ok = last is not None and now - last < 5.0
        ledger_ok = self.ledger is None or self.ledger.healthy
        detail = {**self.driver.describe(), "source": self.source,
                  "meter_reading_age_s": None if last is None else round(now - last, 3),
                  "messages": self.stats.messages, "address": self.address}
        if self.ledger is not None:
            detail["ledger"] = {"ok": ledger_ok, "failed_writes": self.ledger.failed_writes,
                                "lost_lines": self.ledger.lost_lines}
        starting = self._t_started is not None and now - self._t_started < 5.0
        ok = threads_ok and ledger_ok and not self._stop.is_set() and (meter_ok or starting)
        return ok, detail

