"""Record formats shared by every stage (documented in ``docs/formats.md``).

* ``steps.jsonl`` - one :class:`StepRecord` a line.
* ``energy.jsonl`` - one :class:`EnergySample` a line: cumulative joules of one device.

Extra fields are allowed and ignored. Parsing is strict about types (an int field given a float or
a string is an error) and reports the file and the 1-based line of the first bad line.
"""

from __future__ import annotations

import math
from pathlib import Path

import msgspec

from wattprint.errors import InputError


class RequestEntry(msgspec.Struct, omit_defaults=True):
    """One request's part in one engine step."""

    id: str
    prefill_tokens: int
    decode_tokens: int
    context_tokens: int
    stratum: str | None = None
    #: prompt length (emitted by the vLLM hook; optional in files)
    prompt_tokens: int | None = None
    #: true on the request's last step (emitted by the vLLM hook; optional in files)
    finished: bool = False


class StepRecord(msgspec.Struct, omit_defaults=True):
    """One engine step: its wall-clock span (seconds, the clock shared with energy.jsonl) and its requests."""

    step: int
    t_start: float
    t_end: float
    requests: list[RequestEntry]
    model: str | None = None


class EnergySample(msgspec.Struct):
    """A poll of one device's cumulative energy counter."""

    t: float
    device: int
    energy_j: float
    source: str | None = None


_step_decoder = msgspec.json.Decoder(StepRecord)
_energy_decoder = msgspec.json.Decoder(EnergySample)
_encoder = msgspec.json.Encoder()


def encode_line(obj) -> bytes:
    return _encoder.encode(obj) + b"\n"


def _read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from exc


def _locate_bad_line(data: bytes, decoder: msgspec.json.Decoder, path: str) -> InputError:
    """Decode line by line to name the first bad line (only called once the fast path failed)."""
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            decoder.decode(raw)
        except msgspec.ValidationError as exc:
            return InputError(f"invalid record: {exc}", path, lineno)
        except msgspec.DecodeError as exc:
            return InputError(f"malformed JSON: {exc}", path, lineno)
    return InputError("malformed JSON lines", path)


def _decode_lines(data: bytes, decoder: msgspec.json.Decoder, path: str) -> list:
    try:
        return decoder.decode_lines(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise _locate_bad_line(data, decoder, path) from None


def _line_numbers(data: bytes) -> list[int]:
    """1-based line number of each non-blank line (for error messages after the fast path)."""
    return [i for i, raw in enumerate(data.split(b"\n"), start=1) if raw.strip()]


def validate_steps(steps: list[StepRecord], path: str, data: bytes | None = None) -> None:
    """Check order and values; raises :class:`InputError` naming the line."""
    prev_step = None
    prev_end = -math.inf
    lines = None
    for i, s in enumerate(steps):
        problem = None
        if not (math.isfinite(s.t_start) and math.isfinite(s.t_end)):
            problem = "t_start and t_end must be finite numbers"
        elif s.t_end < s.t_start:
            problem = f"t_end {s.t_end} is before t_start {s.t_start}"
        elif prev_step is not None and s.step <= prev_step:
            problem = f"steps out of order: step {s.step} after step {prev_step}"
        elif s.t_start < prev_end - 1e-6:
            problem = f"steps out of order: t_start {s.t_start} is before the previous step's t_end {prev_end}"
        else:
            for r in s.requests:
                if r.prefill_tokens < 0 or r.decode_tokens < 0 or r.context_tokens < 0:
                    problem = f"request {r.id!r} has a negative token count"
                    break
                if r.prefill_tokens + r.decode_tokens == 0:
                    problem = f"request {r.id!r} is scheduled with no tokens"
                    break
        if problem:
            if lines is None:
                lines = _line_numbers(data) if data is not None else None
            raise InputError(problem, path, lines[i] if lines else None)
        prev_step, prev_end = s.step, s.t_end


def read_steps(path: str | Path) -> list[StepRecord]:
    """Parse and validate ``steps.jsonl``."""
    data = _read_bytes(path)
    steps = _decode_lines(data, _step_decoder, str(path))
    validate_steps(steps, str(path), data)
    return steps


def read_energy(path: str | Path) -> list[EnergySample]:
    """Parse and validate ``energy.jsonl``."""
    data = _read_bytes(path)
    samples = _decode_lines(data, _energy_decoder, str(path))
    lines = None
    last_t: dict[int, float] = {}
    for i, s in enumerate(samples):
        problem = None
        if not (math.isfinite(s.t) and math.isfinite(s.energy_j)):
            problem = "t and energy_j must be finite numbers"
        elif s.device < 0:
            problem = f"device must be >= 0, got {s.device}"
        elif s.t < last_t.get(s.device, -math.inf):
            problem = f"samples of device {s.device} out of time order"
        if problem:
            lines = _line_numbers(data)
            raise InputError(problem, str(path), lines[i])
        last_t[s.device] = s.t
    if not samples:
        raise InputError("no energy samples", str(path))
    return samples
