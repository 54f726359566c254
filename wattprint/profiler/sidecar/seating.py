"""Engine sessions' life: a Hello starts (or resumes) a session, seats it on meter devices with its own
attributor, and retires the session it replaces; part of the
:class:`~wattprint.profiler.sidecar.driver.AttributionDriver` (see its docstring for the rules).
Every method here runs with the driver's lock held, except :meth:`Seating.on_hello` and
:meth:`Seating.resume`, which take it."""

from __future__ import annotations

import logging
import time

import msgspec

from wattprint.profiler.sidecar.ingest import hello_problem
from wattprint.profiler.sidecar.sessions import EngineSession
from wattprint.profiler.sidecar.totals import add_totals, on_devices
from wattprint.profiler.transport import messages as transport

log = logging.getLogger("wattprint.profiler.sidecar.driver")


def counts_gpus(source: str) -> bool:
    """Whether a meter's device indices are GPUs (NVML, the simulated GPU, or a replay of either): only
    then do the CUDA device indices a Hello names mean anything to it."""
    base = source.split(":", 1)[-1] if source.startswith("replay:") else source
    return base == "nvml" or base.startswith("simulated")


class Seating:
    """The session part of the driver (a mixin: the driver holds the state)."""

    def resume(self) -> None:
        """Remember the Hellos a previous sidecar saved, for steps arriving before their hooks say Hello."""
        hellos = self.hello_file.load() if self.hello_file is not None else []
        with self.lock:
            for h in hellos:
                if hello_problem(h, self.n_devices) is None:
                    self.saved[transport.session_key(h)] = h

    @property
    def resume_hello(self) -> transport.Hello | None:
        return next(reversed(self.saved.values()), None) if self.saved else None

    def on_hello(self, hello: transport.Hello) -> None:
        if hello.devices is not None and not counts_gpus(self.source):
            hello = msgspec.structs.replace(hello, devices=None)  # GPU indices, a meter of CPU packages
        problem = hello_problem(hello, self.n_devices)
        if problem is not None:
            self._stats.count_drop("invalid_hello")
            self._stats.warn("invalid_hello", "Hello from pid %s rejected: %s", hello.pid, problem)
            return
        key = transport.session_key(hello)
        with self.lock:
            self.hellos += 1
            self.saved.pop(key, None)
            old = self.sessions.get(key)
            if old is not None:
                old.last_seen = time.monotonic()
                if old.hello.model == hello.model and old.hello.model_config == hello.model_config:
                    if old.state == "unmetered":
                        self._seat(old)
                    return  # the same engine again (its hook reconnected)

                self._retire(old)
            if len(self.sessions) >= self.max_sessions and not self._make_room():
                self._stats.count_error("session_limit")
                self._stats.warn("session_limit", "%d engine sessions: Hello from pid %s refused",
                                 len(self.sessions), hello.pid)
                return
            s = EngineSession.from_hello(hello, self.labels(hello.model))
            s.explicit = hello.devices is not None
            self.sessions[key] = s
            if s.geometry is None:
                self._stats.count_error("unsupported_model")
                log.error("wattprint sidecar: model %r cannot be modelled (%s); its devices' energy is counted as "
                          "idle and its steps as dropped (reason unsupported_model)", hello.model, s.error)
            self._seat(s)
            self._save()
        self.flush()
        log.info("wattprint sidecar: engine pid %d, model %r (%s), devices %s", hello.pid, hello.model,
                 s.state, list(s.devices))

    def _seat(self, s: EngineSession) -> None:
        """Give ``s`` its devices and a new attributor (caller holds the lock)."""
        held = {d: o for o in self.sessions.values() if o is not s for d in o.devices}
        if s.explicit:
            want = tuple(s.hello.devices)
            for o in {held[d] for d in want if d in held}:
                if o.explicit or not o.alive():
                    if o.alive():
                        self._stats.count_error("device_conflict")
                        log.error("wattprint sidecar: pid %d claims devices %s held by pid %d", s.pid, list(want), o.pid)
                        return
                    self._retire(o)
                else:  # it took every free device: settle it and start it again on what is left
                    self._unseat(o)
                    o.devices = tuple(d for d in range(self.n_devices) if d not in want and d not in
                                      {x for p in self.sessions.values() if p is not o for x in p.devices})
                    if o.devices:
                        self._start(o)
        else:
            if len(held) >= self.n_devices:
                for o in [o for o in self.sessions.values() if o is not s and not o.alive()]:
                    self._retire(o)
                held = {d: o for o in self.sessions.values() if o is not s for d in o.devices}
            want = tuple(d for d in range(self.n_devices) if d not in held)
        s.devices = want
        if want:
            self._start(s)
        else:
            log.warning("wattprint sidecar: no meter device left for engine pid %d (model %r): unmetered",
                        s.pid, s.hello.model)

    def _start(self, s: EngineSession) -> None:
        att = self._factory(s.accounting_geometry(), self.profile, n_devices=len(s.devices), source=self.source,
                            model_name=s.label, window_s=self.window_s)
        for r in self._recent_readings():
            self._feed_reading(att, s, r)
        s.attributor = att

    def _unseat(self, s: EngineSession) -> None:
        """Settle and forget ``s``'s attributor; its totals go to its model's (caller holds the lock)."""
        att, s.attributor = s.attributor, None
        if att is None:
            return
        try:
            results = att.finish()
        except Exception:  # noqa: BLE001
            self._stats.fail("advance", "attribution finish failed")
            results = []
        self._publish(s, results)
        try:
            t = on_devices(att.totals(), s.devices, self.n_devices)
            self.base_totals[s.label] = add_totals(self.base_totals[s.label], t) if s.label in self.base_totals else t
        except Exception:  # noqa: BLE001
            self._stats.fail("advance", "attribution totals failed")

    def _retire(self, s: EngineSession) -> None:
        self._unseat(s)
        s.devices = ()
        self.sessions.pop(s.key, None)
        self.saved[s.key] = s.hello
        while len(self.saved) > 256:
            self.saved.popitem(last=False)

    def _make_room(self) -> bool:
        now = time.monotonic()
        for s in list(self.sessions.values()):
            if not s.alive() or now - s.last_seen > self.quiet_s:
                self._retire(s)
                return True
        return False

    def _save(self) -> None:
        if self.hello_file is None:
            return
        try:
            self.hello_file.save([s.hello for s in self.sessions.values()])
        except OSError:
            self._stats.fail("hello_file", "cannot save the engines' Hellos to %s", self.hello_file.path)

    @property
    def unsupported_model(self) -> str | None:
        """The model of the latest session the cost model cannot describe (None when there is none)."""
        bad = [s.hello.model for s in self.sessions.values() if s.geometry is None]
        return bad[-1] if bad else None

