"""The ASGI middleware, driven by a tiny ASGI app (and by Starlette when it is installed)."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from wattprint.exporters.http import WattprintMiddleware
from wattprint.profiler.sidecar import access

BASE = "http://sidecar:9464"
KEY = b"k" * 64


def _scope(path="/v1/chat/completions", method="POST", headers=()):
    return {"type": "http", "method": method, "path": path, "headers": [(k.lower(), v) for k, v in headers]}


class EchoApp:
    """Reads the whole body, then answers 200 with the request it saw, in ``chunks`` body messages."""

    def __init__(self, status=200, chunks=1, fail=None):
        self.status = status
        self.chunks = chunks
        self.fail = fail
        self.seen = None

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            m = await receive()
            assert m["type"] == "http.request"
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        self.seen = {"headers": dict(scope["headers"]), "body": body}
        if self.fail:
            raise self.fail
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(self.chunks):
            await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(),
                        "more_body": i < self.chunks - 1})


def _run(app, scope, body_parts, key=KEY):
    msgs = [{"type": "http.request", "body": p, "more_body": i < len(body_parts) - 1} for i, p in enumerate(body_parts)]
    sent = []

    async def receive():
        if msgs:
            return msgs.pop(0)
        await asyncio.sleep(3600)  # a real server blocks until disconnect

    async def send(m):
        sent.append(m)

    asyncio.run(WattprintMiddleware(app, energy_base_url=BASE, url_key=key)(scope, receive, send))
    return sent


def _url(url: str) -> tuple[str, str, str]:
    """(response id, ref, sig) of an energy URL, checked against KEY."""
    parts = urlsplit(url)
    rid = unquote(parts.path.rsplit("/", 1)[1])
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert access.verify(KEY, rid, q["ref"], q["sig"])
    return rid, q["ref"], q["sig"]


def _xargs(app) -> dict:
    return json.loads(app.seen["body"])["vllm_xargs"]


def _headers(sent):
    start = next(m for m in sent if m["type"] == "http.response.start")
    return {k.decode(): v.decode() for k, v in start["headers"]}


def test_headers_from_x_request_id_and_stratum_rewrite():
    app = EchoApp()
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hé"}]}).encode()
    sent = _run(app, _scope(headers=[(b"X-Request-Id", b"abc"), (b"X-Wattprint-Stratum", b"science"),
                                     (b"content-length", str(len(body)).encode())]), [body[:10], body[10:]])
    h = _headers(sent)
    assert h["x-wattprint-request-id"] == "chatcmpl-abc"
    assert h["x-wattprint-energy-url"].startswith(f"{BASE}/v1/requests/chatcmpl-abc?ref=")
    rid, ref, _ = _url(h["x-wattprint-energy-url"])
    seen = json.loads(app.seen["body"])
    assert rid == "chatcmpl-abc" and seen["messages"][0]["content"] == "hé"
    assert seen["vllm_xargs"] == {"stratum": "science", "wattprint_ref": ref}
    assert app.seen["headers"][b"content-length"] == str(len(app.seen["body"])).encode()
    assert list(app.seen["headers"]).count(b"content-length") == 1


def test_request_id_generated_when_absent_and_used_by_the_engine():
    app = EchoApp()
    sent = _run(app, _scope("/v1/completions"), [b'{"model": "m", "prompt": "x"}'])
    h = _headers(sent)
    rid = app.seen["headers"][b"x-request-id"].decode()  # vLLM builds the response id from it
    assert len(rid) == 32 and h["x-wattprint-request-id"] == f"cmpl-{rid}"
    _, ref, _ = _url(h["x-wattprint-energy-url"])
    assert json.loads(app.seen["body"]) == {"model": "m", "prompt": "x", "vllm_xargs": {"wattprint_ref": ref}}
    app = EchoApp()
    sent = _run(app, _scope("/v1/completions"), [b'{"model": "m", "prompt": "x"}'], key=None)
    assert app.seen["body"] == b'{"model": "m", "prompt": "x"}'  # no key: no reference, body untouched
    assert "x-wattprint-energy-url" not in _headers(sent) and "x-wattprint-request-id" in _headers(sent)


def test_same_x_request_id_gets_separate_urls_and_client_refs_are_replaced():
    urls, refs = [], []
    for _ in range(2):
        app = EchoApp()
        body = b'{"model": "m", "vllm_xargs": {"wattprint_ref": "stolen"}}'
        sent = _run(app, _scope(headers=[(b"x-request-id", b"same")]), [body])
        urls.append(_headers(sent)["x-wattprint-energy-url"])
        refs.append(_xargs(app)["wattprint_ref"])
    assert urls[0] != urls[1] and refs[0] != refs[1] and "stolen" not in refs
    assert [_url(u)[1] for u in urls] == refs
    rid, ref, sig = _url(urls[0])
    assert not access.verify(KEY, rid, refs[1], sig)  # a signature is good for one reference only
    assert not access.verify(b"x" * 64, rid, ref, sig)


def test_body_request_id_is_respected():
    app = EchoApp()
    sent = _run(app, _scope(), [b'{"model": "m", "request_id": "mine/1"}'])
    assert b"x-request-id" not in app.seen["headers"]
    h = _headers(sent)
    assert h["x-wattprint-request-id"] == "chatcmpl-mine/1"
    assert _url(h["x-wattprint-energy-url"])[0] == "chatcmpl-mine/1"
    assert "/v1/requests/chatcmpl-mine%2F1?" in h["x-wattprint-energy-url"]


def test_existing_stratum_and_xargs_kept():
    app = EchoApp()
    _run(app, _scope(headers=[(b"x-wattprint-stratum", b"agentic")]),
         [b'{"vllm_xargs": {"stratum": "critical", "k": 1}}'])
    assert _xargs(app).keys() == {"stratum", "k", "wattprint_ref"} and _xargs(app)["stratum"] == "critical"
    app = EchoApp()
    _run(app, _scope(headers=[(b"x-wattprint-stratum", b"agentic")]), [b'{"vllm_xargs": {"k": 1}}'])
    assert {k: v for k, v in _xargs(app).items() if k != "wattprint_ref"} == {"k": 1, "stratum": "agentic"}
    app = EchoApp()
    _run(app, _scope(headers=[(b"x-wattprint-stratum", b"agentic")]), [b'{"vllm_xargs": null}'])
    assert {k: v for k, v in _xargs(app).items() if k != "wattprint_ref"} == {"stratum": "agentic"}


def test_streaming_response_passes_message_by_message():
    app = EchoApp(chunks=5)
    sent = _run(app, _scope(headers=[(b"x-request-id", b"s")]), [b"{}"])
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert [m["body"] for m in bodies] == [f"data: {i}\n\n".encode() for i in range(5)]
    assert [m["more_body"] for m in bodies] == [True] * 4 + [False]
    assert _headers(sent)["content-type"] == "text/event-stream"


def test_other_paths_and_methods_untouched():
    called = []

    async def lifespan_app(s, r, se):
        called.append(s["type"])

    asyncio.run(WattprintMiddleware(lifespan_app)({"type": "lifespan"}, None, None))
    assert called == ["lifespan"]
    for scope in (_scope("/v1/models", "GET"), _scope("/v1/chat/completions", "GET"), _scope("/metrics", "POST")):
        app = EchoApp()
        sent = _run(app, scope, [b'{"a": 1}'])
        assert "x-wattprint-request-id" not in _headers(sent)
        assert b"x-request-id" not in app.seen["headers"]


def test_error_responses_get_no_energy_headers():
    sent = _run(EchoApp(status=400), _scope(headers=[(b"x-request-id", b"e")]), [b"not json"])
    assert "x-wattprint-request-id" not in _headers(sent)


def test_garbage_body_passes_through():
    app = EchoApp()
    _run(app, _scope(headers=[(b"x-wattprint-stratum", b"science")]), [b"\xff\xfe not json", b" at all"])
    assert app.seen["body"] == b"\xff\xfe not json at all"


def test_our_exception_passes_request_through_untouched(monkeypatch):
    async def broken_prepare(self, scope, receive, consumed, prefix):
        consumed.append(await receive())  # read part of the body, then fail
        raise RuntimeError("bug in wattprint")

    monkeypatch.setattr(WattprintMiddleware, "_prepare", broken_prepare)
    app = EchoApp()
    scope = _scope(headers=[(b"x-wattprint-stratum", b"science")])
    sent = _run(app, scope, [b'{"a":', b" 1}"])
    assert app.seen["body"] == b'{"a": 1}'
    assert app.seen["headers"] == dict(scope["headers"])
    assert _headers(sent) == {"content-type": "text/event-stream"}


def test_header_injection_failure_sends_original(monkeypatch):
    app = EchoApp()
    sent = _run(app, _scope(headers=[(b"x-request-id", b"ok")]), [b"{}"])
    assert "x-wattprint-request-id" in _headers(sent)

    async def weird_app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": "not a number", "headers": []})
        await send({"type": "http.response.body", "body": b"x"})

    sent = _run(weird_app, _scope(headers=[(b"x-request-id", b"ok")]), [b"{}"])
    assert sent[0]["status"] == "not a number" and sent[1]["body"] == b"x"


def test_app_exceptions_propagate_unchanged():
    err = ValueError("from the app")
    with pytest.raises(ValueError) as info:
        _run(EchoApp(fail=err), _scope(), [b"{}"])
    assert info.value is err


def test_oversized_body_passes_through():
    app = EchoApp()
    mw_body = [b'{"x": "' + b"a" * 100, b'"}']
    msgs = [{"type": "http.request", "body": p, "more_body": i == 0} for i, p in enumerate(mw_body)]

    async def receive():
        return msgs.pop(0)

    sent = []

    async def send(m):
        sent.append(m)

    mw = WattprintMiddleware(app, energy_base_url=BASE, max_body_bytes=50)
    asyncio.run(mw(_scope(headers=[(b"x-wattprint-stratum", b"science")]), receive, send))
    assert app.seen["body"] == b"".join(mw_body) and "x-wattprint-request-id" not in _headers(sent)


def test_disconnect_while_reading_is_replayed():
    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())
        seen.append(await receive())

    msgs = [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return msgs.pop(0)

    asyncio.run(WattprintMiddleware(app)(_scope(), receive, None))
    assert [m["type"] for m in seen] == ["http.request", "http.disconnect"]


def test_energy_url_from_environment(monkeypatch):
    monkeypatch.setenv("WATTPRINT_ENERGY_URL", "http://10.0.0.5:9999/")
    assert WattprintMiddleware(None).energy_base_url == "http://10.0.0.5:9999"
    monkeypatch.delenv("WATTPRINT_ENERGY_URL")
    assert WattprintMiddleware(None).energy_base_url == "http://127.0.0.1:9464"


def test_with_starlette_add_middleware(monkeypatch):
    """The way vLLM installs it: ``app.add_middleware(WattprintMiddleware)``; streaming still streams."""
    monkeypatch.setenv(access.ENV_URL_KEY, KEY.decode())
    starlette = pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def chat(request: Request):
        body = await request.json()
        rid = request.headers.get("x-request-id")
        if body.get("stream"):
            async def gen():
                for i in range(3):
                    yield f"data: {i}\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")
        return JSONResponse({"id": f"chatcmpl-{rid}", "xargs": body.get("vllm_xargs")})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.add_middleware(WattprintMiddleware)
    assert starlette.__version__
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"messages": []}, headers={"X-Wattprint-Stratum": "critical"})
        assert r.status_code == 200
        assert r.headers["x-wattprint-request-id"] == r.json()["id"]
        url = r.headers["x-wattprint-energy-url"]
        assert url.startswith(f"http://127.0.0.1:9464/v1/requests/{r.json()['id']}?ref=")
        assert r.json()["xargs"] == {"stratum": "critical", "wattprint_ref": _url(url)[1]}
        with client.stream("POST", "/v1/chat/completions", json={"stream": True}) as r:
            assert r.headers["x-wattprint-request-id"].startswith("chatcmpl-")
            assert "".join(r.iter_text()) == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
