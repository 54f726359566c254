"""NvmlMeter against autospecced pynvml functions (no GPU needed)."""

from __future__ import annotations

import ctypes
import sys
from types import SimpleNamespace
from unittest import mock

import pytest

pynvml = pytest.importorskip("pynvml")

from wattprint.errors import MeterError  # noqa: E402
from wattprint.profiler.meters import nvml as nvml_mod  # noqa: E402
from wattprint.profiler.meters.nvml import NvmlMeter, parse_visible_devices  # noqa: E402


class FakeGpu:
    def __init__(
        self,
        uuid,
        name="NVIDIA H100 80GB HBM3",
        energy_mj=(0,),
        energy_supported=True,
        instant_mw=None,
        usage_mw=None,
        mig=False,
        enforced_limit_mw=700_000,
        default_limit_mw=700_000,
    ):
        self.uuid = uuid
        self.name = name
        self.energy_mj = list(energy_mj)
        self.energy_supported = energy_supported
        self.instant_mw = None if instant_mw is None else list(instant_mw)
        self.usage_mw = None if usage_mw is None else list(usage_mw)
        self.mig = mig
        self.enforced_limit_mw = enforced_limit_mw  # None: NOT_SUPPORTED
        self.default_limit_mw = default_limit_mw

    @staticmethod
    def _next(values):
        return values.pop(0) if len(values) > 1 else values[0]


def _err(name):
    return pynvml.NVMLError(getattr(pynvml, name))


def _field_values(value, ret=None):
    arr = (pynvml.c_nvmlFieldValue_t * 1)()
    arr[0].fieldId = pynvml.NVML_FI_DEV_POWER_INSTANT
    arr[0].nvmlReturn = pynvml.NVML_SUCCESS if ret is None else ret
    arr[0].valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    arr[0].value.uiVal = value
    return arr


class FakeNvml:
    """Patches pynvml's functions with autospecced mocks driven by a list of FakeGpu."""

    def __init__(self, monkeypatch, gpus):
        self.gpus = gpus
        self.mocks = {}

        def by_index(i):
            if not 0 <= i < len(self.gpus):
                raise _err("NVML_ERROR_INVALID_ARGUMENT")
            return self.gpus[i]

        def by_uuid(uuid):
            for g in self.gpus:
                if g.uuid == uuid:
                    return g
            raise _err("NVML_ERROR_NOT_FOUND")

        def energy(h):
            if not h.energy_supported:
                raise _err("NVML_ERROR_NOT_SUPPORTED")
            return FakeGpu._next(h.energy_mj)

        def fields(h, ids):
            assert list(ids) == [pynvml.NVML_FI_DEV_POWER_INSTANT]
            if h.instant_mw is None:
                return _field_values(0, ret=pynvml.NVML_ERROR_NOT_SUPPORTED)
            return _field_values(FakeGpu._next(h.instant_mw))

        def usage(h):
            if h.usage_mw is None:
                raise _err("NVML_ERROR_NOT_SUPPORTED")
            return FakeGpu._next(h.usage_mw)

        def limit(attr):
            def read(h):
                if getattr(h, attr) is None:
                    raise _err("NVML_ERROR_NOT_SUPPORTED")
                return getattr(h, attr)

            return read

        impl = {
            "nvmlInit": lambda: None,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetCount": lambda: len(self.gpus),
            "nvmlDeviceGetHandleByIndex": by_index,
            "nvmlDeviceGetHandleByUUID": by_uuid,
            "nvmlDeviceGetName": lambda h: h.name,
            "nvmlDeviceGetUUID": lambda h: h.uuid,
            "nvmlDeviceIsMigDeviceHandle": lambda h: ctypes.c_uint(1 if h.mig else 0),
            "nvmlDeviceGetTotalEnergyConsumption": energy,
            "nvmlDeviceGetFieldValues": fields,
            "nvmlDeviceGetPowerUsage": usage,
            "nvmlDeviceGetEnforcedPowerLimit": limit("enforced_limit_mw"),
            "nvmlDeviceGetPowerManagementDefaultLimit": limit("default_limit_mw"),
            "nvmlSystemGetDriverVersion": lambda: b"550.54.15",
        }
        for name, fn in impl.items():
            m = mock.create_autospec(getattr(pynvml, name), side_effect=fn)
            monkeypatch.setattr(pynvml, name, m)
            self.mocks[name] = m


@pytest.fixture
def clock(monkeypatch):
    """A controllable monotonic clock for the NVML module."""
    state = SimpleNamespace(now=100.0)
    monkeypatch.setattr(nvml_mod, "time", SimpleNamespace(monotonic=lambda: state.now))
    return state


def make(monkeypatch, gpus):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return FakeNvml(monkeypatch, gpus)


def test_energy_counter_in_joules_since_open(monkeypatch, clock):
    fake = make(monkeypatch, [FakeGpu("GPU-a", energy_mj=[5_000_000, 5_001_500, 5_004_000])])
    m = NvmlMeter()
    assert m.source == "nvml"
    assert [d.name for d in m.devices] == ["NVIDIA H100 80GB HBM3"]
    assert m.devices[0].extra["method"] == "energy_counter"
    assert m.devices[0].extra["uuid"] == "GPU-a"
    clock.now = 101.0
    r1 = m.read()
    assert r1.energy_j == pytest.approx((1.5,))  # 1500 mJ -> 1.5 J since open
    assert r1.t_s == pytest.approx(101.0)
    assert r1.source == "nvml"
    r2 = m.read()
    assert r2.energy_j == pytest.approx((4.0,))
    fake.mocks["nvmlInit"].assert_called_once_with()
    fake.mocks["nvmlDeviceGetPowerUsage"].assert_not_called()
    m.close()
    m.close()
    fake.mocks["nvmlShutdown"].assert_called_once_with()
    with pytest.raises(MeterError):
        m.read()


def test_power_instant_integration_when_counter_not_supported(monkeypatch, clock):
    gpu = FakeGpu(
        "GPU-old", name="Tesla P100", energy_supported=False, instant_mw=[100_000, 200_000, 200_000]
    )
    make(monkeypatch, [gpu])
    m = NvmlMeter()
    assert m.devices[0].extra["method"] == "power_instant"
    clock.now = 101.0
    assert m.read().energy_j == pytest.approx((150.0,))  # trapezoid (100 W + 200 W) / 2 * 1 s
    clock.now = 103.0
    assert m.read().energy_j == pytest.approx((550.0,))  # + 200 W * 2 s


def test_power_usage_fallback_when_field_not_supported(monkeypatch, clock):
    gpu = FakeGpu("GPU-old", energy_supported=False, instant_mw=None, usage_mw=[50_000, 70_000])
    fake = make(monkeypatch, [gpu])
    m = NvmlMeter()
    assert m.devices[0].extra["method"] == "power_usage"
    clock.now = 102.0
    assert m.read().energy_j == pytest.approx((120.0,))  # (50 + 70) / 2 W * 2 s
    assert fake.mocks["nvmlDeviceGetPowerUsage"].call_count == 2


def test_no_energy_and_no_power_is_meter_error(monkeypatch, clock):
    fake = make(monkeypatch, [FakeGpu("GPU-x", energy_supported=False)])
    with pytest.raises(MeterError, match="neither"):
        NvmlMeter()
    fake.mocks["nvmlShutdown"].assert_called_once_with()


def test_other_energy_errors_are_meter_errors(monkeypatch, clock):
    fake = make(monkeypatch, [FakeGpu("GPU-a", energy_mj=[1000])])
    m = NvmlMeter()
    fake.mocks["nvmlDeviceGetTotalEnergyConsumption"].side_effect = _err("NVML_ERROR_GPU_IS_LOST")
    with pytest.raises(MeterError, match="nvmlDeviceGetTotalEnergyConsumption"):
        m.read()


def test_cuda_visible_devices_indices_select_and_order(monkeypatch, clock):
    gpus = [FakeGpu(f"GPU-{i}", name=f"gpu{i}", energy_mj=[i * 1000]) for i in range(3)]
    make(monkeypatch, gpus)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    m = NvmlMeter()
    assert [d.name for d in m.devices] == ["gpu2", "gpu0"]
    assert [d.index for d in m.devices] == [0, 1]
    assert [d.extra["selector"] for d in m.devices] == [2, 0]
    assert len(m.read().energy_j) == 2


def test_cuda_visible_devices_uuids(monkeypatch, clock):
    gpus = [FakeGpu(f"GPU-{c}", name=f"gpu-{c}") for c in "abc"]
    fake = make(monkeypatch, gpus)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-c, 0")
    m = NvmlMeter()
    assert [d.name for d in m.devices] == ["gpu-c", "gpu-a"]
    fake.mocks["nvmlDeviceGetHandleByUUID"].assert_called_once_with("GPU-c")


def test_explicit_devices_override_environment(monkeypatch, clock):
    gpus = [FakeGpu(f"GPU-{i}", name=f"gpu{i}") for i in range(3)]
    make(monkeypatch, gpus)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    m = NvmlMeter(devices=[1, "GPU-2"])
    assert [d.name for d in m.devices] == ["gpu1", "gpu2"]


def test_no_visible_device_and_unknown_devices(monkeypatch, clock):
    make(monkeypatch, [FakeGpu("GPU-a")])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    with pytest.raises(MeterError, match="no NVIDIA GPU selected"):
        NvmlMeter()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(MeterError, match="no NVIDIA GPU selected"):
        NvmlMeter()
    with pytest.raises(MeterError, match="NVML index 5"):
        NvmlMeter(devices=[5])
    with pytest.raises(MeterError, match="nvidia-smi -L"):
        NvmlMeter(devices=["GPU-nope"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "zero")
    with pytest.raises(MeterError, match="neither a device index"):
        NvmlMeter()


def test_parse_visible_devices():
    assert parse_visible_devices("0,1") == [0, 1]
    assert parse_visible_devices(" GPU-x ,3,") == ["GPU-x", 3]
    assert parse_visible_devices("1,-1,2") == [1]
    assert parse_visible_devices("") == []


def test_mig_uuid_is_refused(monkeypatch, clock):
    fake = make(monkeypatch, [FakeGpu("GPU-a")])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-4f2a-1")
    with pytest.raises(MeterError, match="MIG.*NVML does not expose energy"):
        NvmlMeter()
    fake.mocks["nvmlDeviceGetHandleByUUID"].assert_not_called()
    fake.mocks["nvmlShutdown"].assert_called_once_with()


def test_mig_handle_is_refused(monkeypatch, clock):
    make(monkeypatch, [FakeGpu("GPU-a", mig=True)])
    with pytest.raises(MeterError, match="MIG"):
        NvmlMeter(devices=[0])


def test_mig_check_not_supported_means_not_mig(monkeypatch, clock):
    fake = make(monkeypatch, [FakeGpu("GPU-v100", energy_mj=[0])])
    fake.mocks["nvmlDeviceIsMigDeviceHandle"].side_effect = _err("NVML_ERROR_NOT_SUPPORTED")
    assert len(NvmlMeter().devices) == 1


def test_counter_reset_is_stitched(monkeypatch, clock):
    # 1000 J at open, 1500 J, driver reload -> 200 J, then 300 J
    make(monkeypatch, [FakeGpu("GPU-a", energy_mj=[1_000_000, 1_500_000, 200_000, 300_000])])
    m = NvmlMeter()
    values = [m.read().energy_j[0] for _ in range(3)]
    assert values == pytest.approx([500.0, 700.0, 800.0])
    assert values == sorted(values)
    assert m.counter_resets == 1
    assert m.counter_resets_by_device == [1]


def test_nvml_init_failure_is_meter_error(monkeypatch):
    fake = make(monkeypatch, [])
    fake.mocks["nvmlInit"].side_effect = _err("NVML_ERROR_LIBRARY_NOT_FOUND")
    with pytest.raises(MeterError, match="NVML is not available"):
        NvmlMeter()
    fake.mocks["nvmlShutdown"].assert_not_called()


def test_missing_pynvml_is_meter_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(MeterError, match="NVML is not available"):
        NvmlMeter()


def test_no_gpu_at_all(monkeypatch):
    make(monkeypatch, [])
    with pytest.raises(MeterError, match="no NVIDIA GPU"):
        NvmlMeter()


def test_same_gpu_twice_is_refused(monkeypatch, clock):
    make(monkeypatch, [FakeGpu("GPU-a"), FakeGpu("GPU-b")])
    with pytest.raises(MeterError, match="selected twice"):
        NvmlMeter(devices=[1, "GPU-b"])


def test_power_limit_is_the_enforced_limit(monkeypatch, clock):
    fake = make(monkeypatch, [FakeGpu("GPU-a", enforced_limit_mw=650_000, default_limit_mw=700_000)])
    m = NvmlMeter()
    gpu = m.gpus[0]
    assert isinstance(gpu, nvml_mod.NvmlGpu)
    assert gpu.power_limit_w() == pytest.approx(650.0)
    assert gpu.enforced_power_limit_mw() == 650_000.0
    assert gpu.default_power_limit_mw() == 700_000.0
    fake.mocks["nvmlDeviceGetEnforcedPowerLimit"].assert_called_with(gpu.handle)


def test_power_limit_falls_back_to_the_default_limit(monkeypatch, clock):
    fake = make(monkeypatch, [FakeGpu("GPU-a", enforced_limit_mw=None, default_limit_mw=400_000)])
    gpu = NvmlMeter().gpus[0]
    assert gpu.power_limit_w() == pytest.approx(400.0)
    fake.mocks["nvmlDeviceGetPowerManagementDefaultLimit"].assert_called_once_with(gpu.handle)
    with pytest.raises(nvml_mod.NvmlCallError) as info:
        gpu.enforced_power_limit_mw()
    assert info.value.code == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert info.value.call == "nvmlDeviceGetEnforcedPowerLimit"


def test_no_power_limit_is_meter_error(monkeypatch, clock):
    make(monkeypatch, [FakeGpu("GPU-a", enforced_limit_mw=None, default_limit_mw=None)])
    gpu = NvmlMeter().gpus[0]
    with pytest.raises(MeterError, match="cannot read the GPU's power limit through NVML"):
        gpu.power_limit_w()


def test_gpus_follow_the_device_order(monkeypatch, clock):
    make(monkeypatch, [FakeGpu(f"GPU-{i}", name=f"gpu{i}") for i in range(3)])
    m = NvmlMeter(devices=[2, 0])
    assert [g.selector for g in m.gpus] == [2, 0]
    assert [g.name() for g in m.gpus] == [d.name for d in m.devices]


def test_driver_version(monkeypatch, clock):
    fake = make(monkeypatch, [FakeGpu("GPU-a")])
    m = NvmlMeter()
    assert m.driver_version() == "550.54.15"
    fake.mocks["nvmlSystemGetDriverVersion"].side_effect = _err("NVML_ERROR_UNINITIALIZED")
    with pytest.raises(nvml_mod.NvmlCallError, match="nvmlSystemGetDriverVersion") as info:
        m.driver_version()
    assert info.value.code == pynvml.NVML_ERROR_UNINITIALIZED
