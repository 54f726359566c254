"""The energy timeline: a sampler thread polling a meter, and energy over any time window.

A counter like NVML's total energy is republished about every 100 ms and reads the same in between. The
timeline polls it at 50 reads per second by default, locked onto the republication's phase (the poll
schedule of :mod:`wattprint.profiler.timeline.schedule`: a few reads clustered around each expected
publish, so a change is bracketed by milliseconds; uniform for counters updated at every read), and keeps, per device, the **change points** given by the counter
rule of :mod:`wattprint.profiler.timeline.counter` (publish time: the midpoint of the two polls around a
change, ``publish_time="midpoint"``, or the sample time for counters updated at every read,
``"sample"``; the default ``"auto"`` picks by the meter's source; a counter that goes back is stitched).

``energy_between(t0, t1)`` evaluates the cumulative energy ``E(t)`` of each device by linear
interpolation between the estimated publish points and returns ``E(t1) - E(t0)``. Outside the first and
last publish points ``E`` is extrapolated with the slope of the nearest segment (a step when there is
only one), and times are clamped to the span the samples cover: the timeline never claims energy for
time it did not observe.

Samples live in a bounded buffer (``maxlen``); samples pushed out are counted in ``dropped`` (change
points have their own bounded buffer). Meter errors are caught and counted (``errors``, ``last_error``):
they never stop the thread. Subscribers (``on_reading=`` or :meth:`subscribe`) receive every reading
from the sampler thread; their exceptions are counted in ``callback_errors``.
The timeline does not own the meter: ``stop()`` does not close it.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

from wattprint.errors import InputError, MeterError
from wattprint.profiler.meters.base import Meter, Reading
from wattprint.profiler.timeline.counter import PUBLISH_MODES, ChangePoint, CounterTrack, publish_mode
from wattprint.profiler.timeline.schedule import PollSchedule

log = logging.getLogger(__name__)


Subscriber = Callable[[Reading], None]


class _Track:
    """One device's change points in a bounded list (head index + occasional compaction), with the
    estimated publish times kept alongside for bisection."""

    def __init__(self, maxlen: int, first_t: float, value: float):
        self.maxlen = maxlen
        self.cps: list[ChangePoint] = []
        self.t_pub: list[float] = []
        self.head = 0
        #: earliest time E(t) is known from: the first sample, later the newest evicted change point
        self.floor_t = first_t
        self.first_value = value

    def __len__(self) -> int:
        return len(self.cps) - self.head

    def append(self, cp: ChangePoint) -> bool:
        """Add a change point; True when the oldest one was evicted to make room."""
        evicted = False
        if len(self) == self.maxlen:
            self.floor_t = self.cps[self.head].t_s
            self.head += 1
            evicted = True
            if self.head >= self.maxlen:
                del self.cps[: self.head]
                del self.t_pub[: self.head]
                self.head = 0
        self.cps.append(cp)
        self.t_pub.append(cp.t_pub_s)
        return evicted

    def retained(self) -> list[ChangePoint]:
        return self.cps[self.head :]

    def energy_at(self, t: float, t_last: float) -> float:
        """Cumulative energy at ``t``: interpolated between publish points, extrapolated at the edges."""
        t = min(max(t, self.floor_t), t_last)
        n = len(self)
        if n == 0:
            return self.first_value
        h = self.head
        if n == 1:
            cp = self.cps[h]
            return cp.energy_j if t >= self.t_pub[h] else cp.prev_energy_j
        i = bisect.bisect_right(self.t_pub, t, lo=h)
        # the segment around t, or the nearest edge segment to extrapolate from
        j = min(max(i, h + 1), len(self.cps) - 1)
        t_a, t_b = self.t_pub[j - 1], self.t_pub[j]
        e_a, e_b = self.cps[j - 1].energy_j, self.cps[j].energy_j
        if t_b <= t_a:
            return e_b if t >= t_b else e_a
        if i == len(self.cps):
            # past the last publish point: extrapolate at most one publish interval (a counter that has
            # not moved for longer than that is not assumed to keep rising)
            t = min(t, t_b + (t_b - t_a))
        e = e_a + (e_b - e_a) * (t - t_a) / (t_b - t_a)
        if i == h:  # before the first publish point: not below the value shown before it
            e = max(e, self.cps[h].prev_energy_j)
        return e


class EnergyTimeline:
    """Poll ``meter`` at ``rate_hz`` on a thread; answer energy over time windows. Thread-safe."""

    def __init__(
        self,
        meter: Meter,
        rate_hz: float = 50.0,
        maxlen: int = 60_000,
        on_reading: Subscriber | None = None,
        publish_time: str = "auto",
        max_change_points: int | None = None,
    ):
        if not (rate_hz > 0 and math.isfinite(rate_hz)):
            raise InputError(f"timeline rate must be a positive number of Hz, got {rate_hz!r}")
        if maxlen < 2:
            raise InputError(f"timeline buffer must hold at least 2 samples, got {maxlen}")
        if publish_time != "auto" and publish_time not in PUBLISH_MODES:
            raise InputError(f"publish_time must be auto, midpoint or sample, got {publish_time!r}")
        if publish_time == "auto":
            publish_time = publish_mode(meter.source)
        self.meter = meter
        self.rate_hz = float(rate_hz)
        self.maxlen = int(maxlen)
        self.publish_time = publish_time
        self._cp_maxlen = int(max_change_points or maxlen)
        self._lock = threading.RLock()
        self._buffer: deque[Reading] = deque(maxlen=self.maxlen)
        self._tracks: list[_Track] = []
        self._counters: list[CounterTrack] = []
        self._last: Reading | None = None
        self._subscribers: list[Subscriber] = [on_reading] if on_reading is not None else []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: readings taken (including those since evicted)
        self.samples = 0
        #: readings pushed out of the bounded buffer
        self.dropped = 0
        #: change points pushed out of their bounded buffers
        self.dropped_change_points = 0
        #: meter.read() failures (caught; the sampler keeps going)
        self.errors = 0
        self.last_error: BaseException | None = None
        #: subscriber exceptions (caught)
        self.callback_errors = 0
        #: readings ignored: time not after the previous one, or a wrong device count
        self.rejected = 0

    # -- sampling ------------------------------------------------------------------------------------

    def subscribe(self, callback: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def unsubscribe(self, callback: Subscriber) -> None:
        with self._lock:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

    def sample_once(self) -> Reading | None:
        """Read the meter once and ingest the reading; on a meter error count it and return None."""
        try:
            reading = self.meter.read()
        except Exception as exc:  # a meter failure must never kill the sampler
            with self._lock:
                self.errors += 1
                self.last_error = exc
                n = self.errors
            if n == 1 or n % 100 == 0:
                log.warning("energy timeline: meter read failed (%d so far): %s", n, exc)
            return None
        self.ingest(reading)
        return reading

    def ingest(self, reading: Reading) -> bool:
        """Add a reading (from the sampler, or fed by hand) and notify subscribers. False if rejected."""
        with self._lock:
            accepted = self._add(reading)
            subscribers = list(self._subscribers) if accepted else []
        for callback in subscribers:
            try:
                callback(reading)
            except Exception as exc:
                with self._lock:
                    self.callback_errors += 1
                    n = self.callback_errors
                if n == 1 or n % 100 == 0:
                    log.warning("energy timeline: subscriber failed (%d so far): %s", n, exc)
        return accepted

    def _add(self, reading: Reading) -> bool:
        last = self._last
        if last is not None and (reading.t_s <= last.t_s or len(reading.energy_j) != len(last.energy_j)):
            self.rejected += 1
            return False
        self.samples += 1
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
        self._buffer.append(reading)
        if last is None:
            self._tracks = [_Track(self._cp_maxlen, reading.t_s, e) for e in reading.energy_j]
            self._counters = [CounterTrack(self.publish_time) for _ in reading.energy_j]
        for dev, e in enumerate(reading.energy_j):
            cp = self._counters[dev].feed(reading.t_s, e)
            if cp is not None and self._tracks[dev].append(cp):
                self.dropped_change_points += 1
        self._last = reading
        return True

    @property
    def counter_resets(self) -> int:
        """Counter resets stitched so far (all devices)."""
        with self._lock:
            return sum(c.resets for c in self._counters)

    def _run(self) -> None:
        schedule = PollSchedule(self.rate_hz, lock=self.publish_time == "midpoint")
        period = 1.0 / self.rate_hz
        while not self._stop.is_set():
            reading = self.sample_once()
            now = time.monotonic()
            if reading is None:  # a failed read: try again a period later
                next_t = now + period
            else:  # the schedule runs on the readings' times, which may lag the clock (the simulated meter)
                next_t = now + (schedule.next_poll(reading.t_s, reading.energy_j) - reading.t_s)
            self._stop.wait(max(next_t - now, 0.0))

    def start(self) -> EnergyTimeline:
        """Start the sampler thread (no-op if already running)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return self
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="wattprint-energy-timeline", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the sampler thread and wait for it (the meter stays open)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        self._thread = None

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def __enter__(self) -> EnergyTimeline:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    # -- queries -------------------------------------------------------------------------------------

    def latest(self) -> Reading | None:
        with self._lock:
            return self._last

    def readings(self) -> list[Reading]:
        """The buffered readings, oldest first."""
        with self._lock:
            return list(self._buffer)

    def change_points(self, device: int = 0) -> list[ChangePoint]:
        with self._lock:
            self._check_device(device)
            return self._tracks[device].retained()

    @property
    def n_devices(self) -> int:
        with self._lock:
            return len(self._last.energy_j) if self._last is not None else 0

    def _check_device(self, device: int) -> None:
        if self._last is None:
            raise MeterError("the energy timeline has no reading yet")
        if not (0 <= device < len(self._last.energy_j)):
            raise InputError(f"no device {device}: the meter reads {len(self._last.energy_j)} devices")

    def energy_between(self, t0: float, t1: float, device: int | None = None) -> float:
        """Joules used between monotonic times ``t0`` and ``t1``: one device, or all summed when None."""
        if t1 < t0:
            raise InputError(f"energy_between: t1 {t1} is before t0 {t0}")
        with self._lock:
            if self._last is None:
                raise MeterError("the energy timeline has no reading yet")
            devs = range(len(self._last.energy_j)) if device is None else [device]
            total = 0.0
            for d in devs:
                self._check_device(d)
                track = self._tracks[d]
                t_last = self._last.t_s
                total += max(0.0, track.energy_at(t1, t_last) - track.energy_at(t0, t_last))
            return total

    def power_w(self, device: int | None = None) -> float | None:
        """Power from the last two change points (one device, or all summed); None until there are two."""
        with self._lock:
            if self._last is None:
                return None
            devs = range(len(self._last.energy_j)) if device is None else [device]
            total = 0.0
            for d in devs:
                self._check_device(d)
                track = self._tracks[d]
                if len(track) < 2:
                    return None
                dt = track.t_pub[-1] - track.t_pub[-2]
                if dt <= 0:
                    return None
                total += (track.cps[-1].energy_j - track.cps[-2].energy_j) / dt
            return total
