"""vLLM plugin entry point (``vllm.general_plugins: wattprint``).

vLLM calls :func:`register` in every process that loads plugins (the API server or ``LLM`` process,
each EngineCore and each worker). It does nothing unless ``WATTPRINT_SIDECAR`` is set; then it patches
vLLM's ``Scheduler`` class once per process, so that the EngineCore process (the only one that runs the
scheduler) reports its steps. Nothing here may break vLLM: any failure is one warning and no hook.
"""

from __future__ import annotations

import logging
import os

from wattprint.profiler.transport.messages import ENV_SIDECAR

# Under the "vllm." namespace so that vLLM's log handler and format apply in its processes.
logger = logging.getLogger("vllm.wattprint")

_state = {"done": False, "installed": False}


def register() -> None:
    """Install the wattprint step hook if ``WATTPRINT_SIDECAR`` is set (at most once per process)."""
    if _state["done"] or not os.environ.get(ENV_SIDECAR):
        return
    _state["done"] = True
    try:
        from wattprint.profiler.vllm.hook import install

        _state["installed"] = install()
    except Exception as exc:  # noqa: BLE001 - never break vLLM
        logger.warning("wattprint: vLLM step hook not installed (%s: %s)", type(exc).__name__, exc)


def installed() -> bool:
    """True when this process has the hook installed."""
    return _state["installed"]
