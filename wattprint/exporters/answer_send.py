"""The response side of energy in the answer: an ASGI ``send`` that adds the request's figure
(:mod:`wattprint.exporters.answer`) to a completion as it goes out.

* ``application/json`` (a non-streaming completion): the start message is held until the body is whole
  (at most ``max_body_bytes``, else everything passes as it was), the figure is looked up, and the start
  goes out with the ``X-Wattprint-*`` headers and a new ``Content-Length``, the body with ``usage.energy``;
* ``text/event-stream``: the start goes out at once (with the headers known then: request id, URL,
  policy); events pass one by one, the usage chunk gains ``usage.energy``, or, when the stream has
  none, ``: energy {...}`` goes out before ``data: [DONE]``;
* anything else, or an error status: untouched but for the headers known at the start.

The figure is looked up once per answer (``fetch(output_tokens)``); ``on_energy`` receives it (the policy
charges it). Exceptions of ours while rewriting leave the message as the application made it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from wattprint.exporters import answer

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20


def _content_type(headers) -> bytes:
    for k, v in headers:
        if k.lower() == b"content-type":
            return v.split(b";")[0].strip().lower()
    return b""


def energy_send(send, *, headers: list[tuple[bytes, bytes]], fetch: Callable[[int | None], Awaitable[dict]],
                on_energy: Callable[[dict], None] | None = None, max_body_bytes: int = MAX_BODY_BYTES):
    """``send`` wrapped (see the module docstring). ``headers``: added to every 2xx start."""
    state = {"mode": None, "start": None, "body": bytearray(), "energy": None}
    events = answer.SSEEvents()

    async def figure(tokens: int | None) -> dict:
        if state["energy"] is None:
            state["energy"] = await fetch(tokens)
            if on_energy is not None:
                try:
                    on_energy(state["energy"])
                except Exception:  # noqa: BLE001 - ours: the answer goes out regardless
                    log.warning("wattprint middleware: could not charge an answer's energy", exc_info=True)
        return state["energy"]

    async def on_start(message):
        state["mode"] = "pass"
        try:
            ok = 200 <= int(message.get("status", 0)) < 300
            if ok:
                ours = {**message, "headers": list(message.get("headers") or []) + headers}
                kind = _content_type(ours["headers"])
                encoded = any(k.lower() == b"content-encoding" for k, _ in ours["headers"])
        except Exception:  # noqa: BLE001 - ours: the application's message as it is
            log.debug("wattprint middleware: could not read a response start", exc_info=True)
            ok = False
        if not ok:
            return await send(message)
        if kind == b"application/json" and not encoded:
            state["mode"], state["start"] = "json", ours
            return None
        state["mode"] = "sse" if kind == b"text/event-stream" else "pass"
        return await send(ours)

    async def json_body(message):
        state["body"] += message.get("body", b"") or b""
        if len(state["body"]) > max_body_bytes:  # too large to hold: give up, let it through as it is
            state["mode"] = "pass"
            await send(state["start"])
            return await send({**message, "body": bytes(state["body"])})
        if message.get("more_body", False):
            return None
        body, start = bytes(state["body"]), state["start"]
        try:
            energy = await figure(answer.completion_tokens(body))
            new = answer.with_usage_energy(body, energy)
            body = new if new is not None else body
            start = {**start, "headers": [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                     + [(b"content-length", str(len(body)).encode())] + answer.energy_headers(energy)}
        except Exception:  # noqa: BLE001 - ours: send what the application made
            log.warning("wattprint middleware: could not add energy to an answer", exc_info=True)
            body, start = bytes(state["body"]), state["start"]
        await send(start)
        return await send({"type": "http.response.body", "body": body, "more_body": False})

    async def sse_body(message):
        more = message.get("more_body", False)
        out = []
        for event in events.feed(message.get("body", b"") or b""):
            try:
                if state["energy"] is None and answer.usage_event(event):
                    event = answer.event_with_energy(event, await figure(answer.completion_tokens(
                        answer.event_data(event) or b"")))
                elif answer.is_done(event) and state["energy"] is None:
                    out.append(answer.energy_comment(await figure(None)))
            except Exception:  # noqa: BLE001 - ours: the event as it was
                log.warning("wattprint middleware: could not add energy to a stream", exc_info=True)
            out.append(event)
        if not more:
            out.append(events.rest())
        if out or not more:
            return await send({**message, "body": b"".join(out)})
        return None

    async def send_with_energy(message):
        kind = message.get("type")
        if kind == "http.response.start":
            return await on_start(message)
        if kind == "http.response.body" and state["mode"] == "json":
            return await json_body(message)
        if kind == "http.response.body" and state["mode"] == "sse":
            return await sse_body(message)
        return await send(message)

    return send_with_energy
