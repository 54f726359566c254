"""The sidecar's HTTP API: who may read which record (:class:`RequestAccess`) and its OpenAPI description
(:data:`OPENAPI`, served at ``/openapi.json``). The server itself is :mod:`wattprint.exporters.api`."""

from __future__ import annotations

from collections.abc import Callable

from wattprint.profiler.core.results import RequestResult
from wattprint.profiler.sidecar import access

MAX_PATH_ID_CHARS = 512

_UNAUTHORIZED = {"error": "a credential is required: the URL named by X-Wattprint-Energy-Url (ref and sig), "
                          "or an operator token (Authorization: Bearer ...)"}
_FORBIDDEN = {"error": "this credential does not give access to this record"}


class RequestAccess:
    """``requests_fn`` of :func:`wattprint.exporters.api.make_app`: a signed per-request URL reads the
    records with its reference, an operator token reads anything, anyone else gets 401 or 403."""

    def __init__(self, key: bytes | None, operator_token: str | None,
                 by_ref: Callable[[str, str], RequestResult | None],
                 by_name: Callable[[str], RequestResult | None]):
        self.key, self.operator_token, self.by_ref, self.by_name = key, operator_token, by_ref, by_name

    def __call__(self, rid: str, query: dict, authorization: str | None) -> tuple[int, RequestResult | dict]:
        if len(rid) > MAX_PATH_ID_CHARS:
            return 404, {"error": "unknown request id", "id": rid[:64]}
        if authorization is not None and access.operator_ok(self.operator_token, authorization):
            result = self.by_name(rid)
        else:
            ref, sig = query.get("ref"), query.get("sig")
            if authorization is None and ref is None and sig is None:
                return 401, _UNAUTHORIZED
            if (self.key is None or not ref or not sig or len(ref) > access.MAX_REF_CHARS
                    or not access.verify(self.key, rid, ref, sig)):
                return 403, _FORBIDDEN
            result = self.by_ref(ref, rid)
        if result is None:
            return 404, {"error": f"unknown request id {rid!r}: not seen yet, or evicted from memory "
                                  "(finished requests are also in the ledger)", "id": rid}
        return 200, result


_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_RECORD = {
    "type": "object",
    "required": ["id", "energy_j", "prefill_j", "decode_j", "kv_j", "prompt_tokens", "output_tokens", "status",
                 "source"],
    "properties": {
        "id": {"type": "string"}, "engine": {"type": "string"},
        "energy_j": _NUM, "prefill_j": _NUM, "decode_j": _NUM, "kv_j": _NUM, "compute_j": _NUM,
        "weights_j": _NUM, "static_j": _NUM, "kv_read_bytes": _NUM, "kv_write_bytes": _NUM, "flops": _NUM,
        "prompt_tokens": {"type": "integer", "minimum": 0}, "output_tokens": {"type": "integer", "minimum": 0},
        "cached_prompt_tokens": {"type": "integer", "minimum": 0},
        "stratum": {"type": ["string", "null"]}, "source": {"type": "string"},
        "t_start": _NUM_OR_NULL, "t_end": _NUM_OR_NULL, "model": {"type": ["string", "null"]},
        "status": {"type": "string", "enum": ["final", "provisional", "incomplete"]},
        "missing": {"type": ["string", "null"]},
        "flops_per_j": _NUM_OR_NULL, "efficiency_class": {"type": ["string", "null"]},
        "j_per_output_token": _NUM_OR_NULL,
    },
}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}


def _json(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


OPENAPI = {
    "openapi": "3.1.0",
    "info": {"title": "wattprint sidecar", "version": "1",
             "description": "Per-request energy of LLM inference, measured and attributed by the wattprint "
                            "sidecar. See docs/operations.md."},
    "components": {
        "securitySchemes": {
            "operator": {"type": "http", "scheme": "bearer", "description": "the operator token"},
        },
        "schemas": {"RequestRecord": _RECORD, "Error": _ERROR},
    },
    "paths": {
        "/metrics": {"get": {
            "summary": "Prometheus metrics (text, or OpenMetrics with exemplars by content negotiation)",
            "responses": {"200": {"description": "the exposition",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/healthz": {"get": {
            "summary": "health: threads, meter, ledger, engines",
            "responses": {"200": _json("healthy", {"type": "object"}),
                          "503": _json("unhealthy", {"type": "object"})}}},
        "/openapi.json": {"get": {"summary": "this description",
                                  "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})}}},
        "/v1/requests/{id}": {"get": {
            "summary": "one request's energy record",
            "description": "Readable through the URL the HTTP middleware named in the answer "
                           "(X-Wattprint-Energy-Url: its ref and sig), or by an operator with the bearer token "
                           "(by engine id, response id or exemplar reference).",
            "security": [{}, {"operator": []}],
            "parameters": [
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}},
                {"name": "ref", "in": "query", "required": False, "schema": {"type": "string"}},
                {"name": "sig", "in": "query", "required": False, "schema": {"type": "string"}},
            ],
            "responses": {
                "200": _json("the record (status final, provisional or incomplete)",
                             {"$ref": "#/components/schemas/RequestRecord"}),
                "401": _json("no credential", {"$ref": "#/components/schemas/Error"}),
                "403": _json("a credential that does not give access to this record",
                             {"$ref": "#/components/schemas/Error"}),
                "404": _json("unknown or evicted", {"$ref": "#/components/schemas/Error"}),
            }}},
    },
}
