"""Hello.devices (issue 9): the vLLM hook names the CUDA devices its engine runs on when it knows them, and
a sidecar whose meter does not count GPUs ignores them."""

from __future__ import annotations

import os
from types import SimpleNamespace as NS

from test_sidecar import LLAMA, _sidecar

from wattprint.profiler.sidecar.seating import counts_gpus
from wattprint.profiler.transport import messages as transport
from wattprint.profiler.vllm.hello import engine_devices


def _config(device_type="cuda", world=1, local=None, rank=None, **extra):
    pc = NS(world_size=world, local_world_size=world if local is None else local, data_parallel_rank_local=rank,
            **extra)
    return NS(device_config=NS(device_type=device_type), parallel_config=pc)


def test_engine_devices():
    assert engine_devices(_config()) == [0]
    assert engine_devices(_config(world=2)) == [0, 1]  # tensor parallel
    assert engine_devices(_config(world=2, rank=1)) == [2, 3]  # the second data-parallel rank's own
    assert engine_devices(_config(device_type="cpu")) is None  # the CPU engine: the default
    assert engine_devices(_config(world=4, local=2)) is None  # across nodes
    assert engine_devices(_config(device_ids=[5])) is None  # explicit ids: not the visible list's positions
    assert engine_devices(NS()) is None


def test_a_cpu_meter_ignores_gpu_indices(tmp_path):
    assert counts_gpus("nvml") and counts_gpus("simulated") and counts_gpus("replay:nvml")
    assert not counts_gpus("rapl") and not counts_gpus("cputime-estimate")
    sc = _sidecar(os.path.join(str(tmp_path), "wp.sock"), metrics_port=None, source="rapl")
    sc._process([(transport.Hello(pid=os.getpid(), model="m", model_config=LLAMA, devices=[3]), 0.0, False)])
    assert sc.snapshot().dropped == {} and sc.driver.sessions[f"pid:{os.getpid()}"].devices == (0, 1)
    sc = _sidecar(os.path.join(str(tmp_path), "wp2.sock"), metrics_port=None)  # a GPU meter: they count
    sc._process([(transport.Hello(pid=os.getpid(), model="m", model_config=LLAMA, devices=[1]), 0.0, False)])
    assert sc.driver.sessions[f"pid:{os.getpid()}"].devices == (1,)
