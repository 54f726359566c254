"""The engine's identity, as the hook's :class:`~wattprint.profiler.transport.messages.Hello` tells it:
the served model's name and Hugging Face config (the cost model's geometry), vLLM's version, the KV
block size, the tensor-parallel size and the devices it runs on, read from the scheduler's ``vllm_config``."""

from __future__ import annotations

import json
import os

from wattprint.profiler.transport.messages import Hello


def _jsonable(obj) -> dict:
    return json.loads(json.dumps(obj, default=str))


def _model_config_dict(model_config) -> dict:
    """The served model's Hugging Face config as a plain dict ({} if unavailable)."""
    hf = getattr(model_config, "hf_config", None)
    if hf is not None and hasattr(hf, "to_dict"):
        try:
            return _jsonable(hf.to_dict())
        except Exception:  # noqa: BLE001
            pass
    path = os.path.join(str(getattr(model_config, "model", "")), "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return _jsonable(json.load(f))
    except (OSError, ValueError):
        return {}


def engine_devices(vllm_config) -> list[int] | None:
    """The meter's device indices this engine runs on, when known: on CUDA devices, the positions in the
    ``CUDA_VISIBLE_DEVICES`` the server was started with (the NVML meter numbers devices the same way,
    and the sidecar is to see the GPUs vLLM uses: docs/operations.md) that vLLM gives this engine: a
    data-parallel rank's own ``world_size`` of them, the first ones otherwise. None (the Hello's default:
    the sidecar gives the engine every device no other engine holds) off CUDA, across nodes, or when
    vLLM was given explicit device ids."""
    dc = getattr(vllm_config, "device_config", None)
    pc = getattr(vllm_config, "parallel_config", None)
    if dc is None or pc is None or getattr(dc, "device_type", None) != "cuda":
        return None
    try:
        world = int(pc.world_size)
        local = int(getattr(pc, "local_world_size", world))
        rank = int(getattr(pc, "data_parallel_rank_local", None) or 0)
    except (AttributeError, TypeError, ValueError):
        return None
    if local != world or world < 1 or rank < 0 or getattr(pc, "device_ids", None):
        return None
    return list(range(rank * world, (rank + 1) * world))


def make_hello(scheduler, pid: int) -> Hello:
    """The Hello of the engine that owns ``scheduler`` (reads ``scheduler.vllm_config``)."""
    import vllm

    vc = scheduler.vllm_config
    mc = vc.model_config
    name = getattr(mc, "served_model_name", None) or getattr(mc, "model", "") or ""
    if isinstance(name, (list, tuple)):
        name = name[0] if name else ""
    block_size = getattr(getattr(vc, "cache_config", None), "block_size", None)
    tp = getattr(getattr(vc, "parallel_config", None), "tensor_parallel_size", 1)
    return Hello(
        pid=pid,
        model=str(name),
        model_config=_model_config_dict(mc),
        engine="vllm",
        engine_version=str(getattr(vllm, "__version__", "")),
        kv_block_size=int(block_size) if block_size is not None else None,
        tensor_parallel_size=int(tp or 1),
        devices=engine_devices(vc),
    )
