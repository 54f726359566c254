"""NVIDIA GPUs through NVML (``pynvml`` from the ``nvidia-ml-py`` distribution).

Two ways to get joules, chosen per device when the meter is opened:

* ``energy_counter`` - ``nvmlDeviceGetTotalEnergyConsumption``: cumulative millijoules since the driver
  was loaded (Volta and newer). NVML republishes it roughly every 100 ms; between republications a poll
  returns the same value (the timeline estimates the publish times).
* ``power_instant`` / ``power_usage`` - on GPUs where the counter is ``NOT_SUPPORTED``: power in
  milliwatts from the ``NVML_FI_DEV_POWER_INSTANT`` field value, else from ``nvmlDeviceGetPowerUsage``
  (a 1 s average on Ampere and newer), integrated with the trapezoidal rule between two ``read()``
  calls. Integration happens on each ``read()``, so poll often (the timeline polls at 50 Hz).

``Reading.energy_j`` are joules since the meter was opened. A counter that goes backwards (the driver
was reloaded) is stitched: an offset per device keeps the figure monotone, and ``counter_resets``
counts the resets.

Device selection: an explicit ``devices=[...]`` (integer NVML indices and/or ``GPU-...`` UUIDs), else
``CUDA_VISIBLE_DEVICES`` (same syntax, comma separated), else every GPU NVML sees. Position ``i`` of
``Reading.energy_j`` is then CUDA's device ``cuda:i``. Integer indices are NVML's (PCI bus) order: set
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA numbers GPUs the same way. UUIDs must be complete
(``nvidia-smi -L`` lists them). MIG devices are refused: NVML does not expose energy per MIG instance.

``pynvml`` is imported inside the functions that need it (importing wattprint never requires it) and is
always called as ``pynvml.<function>``, so tests can patch the module's attributes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from wattprint.errors import MeterError
from wattprint.profiler.meters.base import DeviceInfo, Meter, Reading
from wattprint.profiler.timeline.counter import stitched_offset_j

log = logging.getLogger(__name__)

#: how joules are obtained for one device
METHOD_ENERGY_COUNTER = "energy_counter"
METHOD_POWER_INSTANT = "power_instant"
METHOD_POWER_USAGE = "power_usage"

_MIG_MESSAGE = (
    "{what} is a MIG device: NVML does not expose energy or power per MIG instance, only for the "
    "whole GPU. Select the parent GPU (its GPU-... UUID or index) and split its energy yourself."
)


class NvmlCallError(MeterError):
    """An NVML call failed. ``code`` is NVML's error code (``pynvml.NVML_ERROR_*``), ``call`` the function.

    :func:`_call` is the one place where ``pynvml.NVMLError`` becomes this error.
    """

    def __init__(self, message: str, code: int | None = None, call: str = ""):
        super().__init__(message)
        self.code = code
        self.call = call


def _pynvml():
    """Import pynvml lazily; MeterError when it is not installed."""
    try:
        import pynvml
    except ImportError as exc:
        raise MeterError(f"NVML is not available: the nvidia-ml-py package is not installed ({exc})") from exc
    return pynvml


def _call(name: str, *args):
    """Call ``pynvml.<name>(*args)``, mapping ``pynvml.NVMLError`` to :class:`NvmlCallError`."""
    pynvml = _pynvml()
    try:
        return getattr(pynvml, name)(*args)
    except pynvml.NVMLError as exc:
        code = getattr(exc, "value", None)
        raise NvmlCallError(f"{name} failed: {exc}", code=code, call=name) from exc


def _is_code(exc: NvmlCallError, *names: str) -> bool:
    pynvml = _pynvml()
    return exc.code is not None and any(exc.code == getattr(pynvml, n, object()) for n in names)


def _as_int(value) -> int:
    """pynvml returns plain ints for most calls but ctypes values for some (IsMigDeviceHandle)."""
    return int(getattr(value, "value", value))


def _as_str(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def parse_visible_devices(spec: str) -> list[int | str]:
    """Parse a ``CUDA_VISIBLE_DEVICES`` value: integer indices and/or ``GPU-``/``MIG-`` UUIDs.

    Like CUDA, a negative index ends the list (``-1`` hides every GPU). Anything else that is neither an
    integer nor a UUID is a :class:`MeterError`.
    """
    out: list[int | str] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.startswith(("GPU-", "MIG-")):
            out.append(item)
            continue
        try:
            index = int(item)
        except ValueError:
            raise MeterError(
                f"CUDA_VISIBLE_DEVICES={spec!r}: {item!r} is neither a device index nor a GPU-/MIG- UUID"
            ) from None
        if index < 0:
            break
        out.append(index)
    return out


class NvmlGpu:
    """One NVIDIA GPU: its handle and one method per NVML call wattprint makes (as in Zeus)."""

    def __init__(self, handle, selector: int | str):
        self.handle = handle
        self.selector = selector

    @classmethod
    def by_index(cls, index: int) -> NvmlGpu:
        try:
            return cls(_call("nvmlDeviceGetHandleByIndex", index), index)
        except NvmlCallError as exc:
            try:
                seen = f"NVML sees {_as_int(_call('nvmlDeviceGetCount'))} GPUs"
            except NvmlCallError:
                seen = "NVML cannot count GPUs"
            raise MeterError(f"no GPU with NVML index {index} ({seen}): {exc}") from exc

    @classmethod
    def by_uuid(cls, uuid: str) -> NvmlGpu:
        try:
            return cls(_call("nvmlDeviceGetHandleByUUID", uuid), uuid)
        except NvmlCallError as exc:
            raise MeterError(f"no GPU with UUID {uuid!r} ({exc}); `nvidia-smi -L` lists the full UUIDs") from exc

    def name(self) -> str:
        return _as_str(_call("nvmlDeviceGetName", self.handle))

    def uuid(self) -> str | None:
        try:
            return _as_str(_call("nvmlDeviceGetUUID", self.handle))
        except NvmlCallError:
            return None

    def is_mig(self) -> bool:
        try:
            return bool(_as_int(_call("nvmlDeviceIsMigDeviceHandle", self.handle)))
        except NvmlCallError as exc:
            # pre-Ampere GPUs and old drivers: no MIG at all
            if _is_code(exc, "NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND"):
                return False
            raise

    def total_energy_mj(self) -> int:
        return _as_int(_call("nvmlDeviceGetTotalEnergyConsumption", self.handle))

    def power_instant_mw(self) -> float:
        pynvml = _pynvml()
        values = _call("nvmlDeviceGetFieldValues", self.handle, [pynvml.NVML_FI_DEV_POWER_INSTANT])
        entry = values[0]
        ret = int(getattr(entry, "nvmlReturn", 0))
        if ret != pynvml.NVML_SUCCESS:
            raise NvmlCallError(f"nvmlDeviceGetFieldValues(NVML_FI_DEV_POWER_INSTANT) failed with NVML error "
                                f"{ret}", code=ret, call="nvmlDeviceGetFieldValues")
        return _field_value(entry)

    def power_usage_mw(self) -> float:
        return float(_as_int(_call("nvmlDeviceGetPowerUsage", self.handle)))

    def enforced_power_limit_mw(self) -> float:
        return float(_as_int(_call("nvmlDeviceGetEnforcedPowerLimit", self.handle)))

    def default_power_limit_mw(self) -> float:
        return float(_as_int(_call("nvmlDeviceGetPowerManagementDefaultLimit", self.handle)))

    def power_limit_w(self) -> float:
        """The power limit in force, in watts: the enforced limit, else the default one."""
        try:
            return self.enforced_power_limit_mw() / 1000.0
        except NvmlCallError:
            try:
                return self.default_power_limit_mw() / 1000.0
            except NvmlCallError as exc:
                raise MeterError(f"cannot read the GPU's power limit through NVML: {exc}") from exc


def _field_value(entry) -> float:
    """The number in a ``c_nvmlFieldValue_t`` according to its ``valueType``."""
    pynvml = _pynvml()
    member = {
        pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
        pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
        pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
        getattr(pynvml, "NVML_VALUE_TYPE_SIGNED_INT", 5): "siVal",
        getattr(pynvml, "NVML_VALUE_TYPE_UNSIGNED_SHORT", 6): "usVal",
    }.get(int(entry.valueType))
    if member is None:
        raise MeterError(f"NVML field value of unknown type {int(entry.valueType)}")
    return float(getattr(entry.value, member))


@dataclass
class _DeviceState:
    """Per-device bookkeeping: the method, the baseline, stitching offset and integration state."""

    gpu: NvmlGpu
    method: str
    base_j: float = 0.0  # counter value at open (energy_counter)
    last_raw_j: float | None = None  # last counter value read (energy_counter)
    offset_j: float = 0.0  # sum of the counter values lost to resets
    resets: int = 0
    last_power_w: float | None = None  # power integration
    last_t_s: float | None = None
    integrated_j: float = 0.0


class NvmlMeter(Meter):
    """Cumulative joules of NVIDIA GPUs since the meter was opened. See the module docstring."""

    source = "nvml"

    def __init__(self, devices: Sequence[int | str] | None = None, *, env: dict | None = None):
        """Open NVML and select devices.

        ``devices``: NVML indices and/or GPU UUIDs; overrides ``CUDA_VISIBLE_DEVICES`` (read from ``env``,
        default ``os.environ``). Raises :class:`MeterError` when NVML is missing, a device does not exist
        or is a MIG device, or a device offers neither an energy counter nor a power reading.
        """
        self._lock = threading.Lock()
        self._closed = False
        self._initialised = False
        try:
            _call("nvmlInit")
        except NvmlCallError as exc:
            raise MeterError(f"NVML is not available: {exc} (is the NVIDIA driver installed and loaded?)") from exc
        except OSError as exc:  # pragma: no cover - pynvml maps loading errors itself
            raise MeterError(f"NVML is not available: {exc}") from exc
        self._initialised = True
        try:
            self._states = self._open(devices, os.environ if env is None else env)
            self._devices = [
                DeviceInfo(index=i, name=s.gpu.name(),
                           extra={"selector": s.gpu.selector, "uuid": s.gpu.uuid(), "method": s.method})
                for i, s in enumerate(self._states)
            ]
        except BaseException:
            self.close()
            raise
        log.info("nvml meter: %s", ", ".join(f"{d.index}={d.name} ({d.extra['method']})"
                                            for d in self._devices))

    def _selectors(self, devices, env) -> list[int | str]:
        if devices is not None:
            selectors, origin = list(devices), "devices argument"
        elif (visible := env.get("CUDA_VISIBLE_DEVICES")) is not None:
            selectors, origin = parse_visible_devices(visible), f"CUDA_VISIBLE_DEVICES={visible!r}"
        else:
            selectors, origin = list(range(_as_int(_call("nvmlDeviceGetCount")))), "NVML"
        if not selectors:
            raise MeterError(f"no NVIDIA GPU selected ({origin} names none)")
        return selectors

    def _open(self, devices, env) -> list[_DeviceState]:
        states = []
        uuids: dict[str, int | str] = {}
        for sel in self._selectors(devices, env):
            if isinstance(sel, str):
                if sel.startswith("MIG-"):
                    raise MeterError(_MIG_MESSAGE.format(what=sel))
                gpu = NvmlGpu.by_uuid(sel)
            elif isinstance(sel, int) and not isinstance(sel, bool):
                gpu = NvmlGpu.by_index(sel)
            else:
                raise MeterError(f"device selector {sel!r} is neither an NVML index nor a GPU UUID")
            if gpu.is_mig():
                raise MeterError(_MIG_MESSAGE.format(what=f"device {sel!r}"))
            uuid = gpu.uuid()
            if uuid is not None:
                if uuid in uuids:
                    raise MeterError(f"GPU {uuid} is selected twice (as {uuids[uuid]!r} and {sel!r})")
                uuids[uuid] = sel
            states.append(self._probe(gpu))
        return states

    def _probe(self, gpu: NvmlGpu) -> _DeviceState:
        """Pick the method for one device and take its baseline."""
        try:
            raw_mj = gpu.total_energy_mj()
        except NvmlCallError as exc:
            if not _is_code(exc, "NVML_ERROR_NOT_SUPPORTED"):
                raise
        else:
            return _DeviceState(gpu, METHOD_ENERGY_COUNTER, base_j=raw_mj / 1000.0, last_raw_j=raw_mj / 1000.0)
        readers = ((METHOD_POWER_INSTANT, gpu.power_instant_mw), (METHOD_POWER_USAGE, gpu.power_usage_mw))
        for method, read in readers:
            try:
                power_w = read() / 1000.0
            except NvmlCallError as exc:
                log.debug("nvml device %r: %s unavailable: %s", gpu.selector, method, exc)
                continue
            return _DeviceState(gpu, method, last_power_w=power_w, last_t_s=time.monotonic())
        raise MeterError(f"GPU {gpu.selector!r} offers neither the NVML energy counter nor a power reading "
                         "(NOT_SUPPORTED)")

    @property
    def devices(self) -> list[DeviceInfo]:
        return list(self._devices)

    @property
    def counter_resets(self) -> int:
        """How many times an energy counter went backwards (driver reload) and was stitched, all devices."""
        return sum(s.resets for s in self._states)

    @property
    def counter_resets_by_device(self) -> list[int]:
        return [s.resets for s in self._states]

    @property
    def gpus(self) -> list[NvmlGpu]:
        """The selected GPUs' device objects, in the order of :attr:`devices` (for queries beyond energy)."""
        return [s.gpu for s in self._states]

    def driver_version(self) -> str:
        """The NVIDIA driver's version (``nvmlSystemGetDriverVersion``; NVML is initialised while open)."""
        return _as_str(_call("nvmlSystemGetDriverVersion"))

    def read(self) -> Reading:
        with self._lock:
            if self._closed:
                raise MeterError("the NVML meter is closed")
            t_before = time.monotonic()
            energies = []
            for state in self._states:
                if state.method == METHOD_ENERGY_COUNTER:
                    energies.append(self._read_counter(state))
                else:
                    energies.append(self._read_power(state))
            t_s = (t_before + time.monotonic()) / 2.0
            return Reading(t_s=t_s, energy_j=tuple(energies), source=self.source)

    def _read_counter(self, state: _DeviceState) -> float:
        raw_j = state.gpu.total_energy_mj() / 1000.0
        if state.last_raw_j is not None and raw_j < state.last_raw_j:
            # The counter restarted (driver reload): stitched by the counter rule, so the cumulative
            # figure never goes backwards.
            state.offset_j = stitched_offset_j(state.last_raw_j, raw_j, state.offset_j)
            state.resets += 1
            log.warning("nvml device %r: energy counter went backwards (%.3f J -> %.3f J); stitched "
                        "(reset #%d)", state.gpu.selector, state.last_raw_j, raw_j, state.resets)
        state.last_raw_j = raw_j
        return raw_j + state.offset_j - state.base_j

    def _read_power(self, state: _DeviceState) -> float:
        if state.method == METHOD_POWER_INSTANT:
            power_w = state.gpu.power_instant_mw() / 1000.0
        else:
            power_w = state.gpu.power_usage_mw() / 1000.0
        t_s = time.monotonic()
        if state.last_t_s is not None and state.last_power_w is not None:
            dt = max(0.0, t_s - state.last_t_s)
            state.integrated_j += 0.5 * (state.last_power_w + power_w) * dt
        state.last_power_w = power_w
        state.last_t_s = t_s
        return state.integrated_j

    def close(self) -> None:
        """Shut NVML down (once); later reads raise :class:`MeterError`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._initialised:
                return
            try:
                _call("nvmlShutdown")
            except Exception as exc:  # shutting down must not raise
                log.debug("nvmlShutdown failed: %s", exc)
