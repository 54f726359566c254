"""Who may read a request's energy: per-request signed URLs and the operator's token.

The HTTP middleware gives each request a random reference (``ref``, passed to the engine as
``vllm_xargs.wattprint_ref`` and carried by the hook's step records) and hands the client the URL
``<public base>/v1/requests/<response id>?ref=<ref>&sig=<signature>``, where the signature is an
HMAC-SHA256 of the response id and the reference under a key that only the middleware and the sidecar
hold. The sidecar answers such a URL with the records that carry that reference, and nothing else; a
request without a credential gets 401, a wrong one 403. An operator reads any record (by engine id,
response id or exemplar reference) with ``Authorization: Bearer <operator token>``.

Exemplars of the request-energy histograms on ``/metrics`` carry :func:`pseudonym` of a record (an HMAC,
not its id): it leads an operator to the record, and tells anyone else nothing.

The key: ``WATTPRINT_URL_KEY`` (the key itself, as ``wattprint serve`` passes it to the server), else the
file named by ``WATTPRINT_URL_KEY_FILE``, else ``url.key`` in the sidecar's private runtime directory
(created 0600 by the sidecar; read only when private and ours).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from urllib.parse import quote

from wattprint.errors import ConfigError

ENV_URL_KEY = "WATTPRINT_URL_KEY"
ENV_URL_KEY_FILE = "WATTPRINT_URL_KEY_FILE"
ENV_OPERATOR_TOKEN = "WATTPRINT_OPERATOR_TOKEN"
ENV_OPERATOR_TOKEN_FILE = "WATTPRINT_OPERATOR_TOKEN_FILE"
REF_ARG = "wattprint_ref"  # the key of the reference in vllm_xargs / SamplingParams.extra_args
MAX_REF_CHARS = 64


def new_ref() -> str:
    """A fresh random request reference (128 bits, URL-safe)."""
    return secrets.token_urlsafe(16)


def _mac(key: bytes, *parts: str) -> str:
    digest = hmac.new(key, "\n".join(parts).encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode()


def sign(key: bytes, response_id: str, ref: str) -> str:
    """The signature of one request's energy URL."""
    return _mac(key, "wattprint-url-v1", response_id, ref)


def verify(key: bytes, response_id: str, ref: str, sig: str) -> bool:
    return hmac.compare_digest(sign(key, response_id, ref).encode(), str(sig).encode("utf-8", "replace"))


def pseudonym(key: bytes, record_key: str) -> str:
    """The exemplar reference of a record: stable, unguessable without the key."""
    return "x" + _mac(key, "wattprint-exemplar-v1", record_key)[:16]


def request_path(response_id: str, ref: str, sig: str) -> str:
    """The path (and query) of one request's energy record, with its credential."""
    return f"/v1/requests/{quote(response_id, safe='')}?ref={quote(ref, safe='')}&sig={quote(sig, safe='')}"


def energy_url(base: str, key: bytes, response_id: str, ref: str) -> str:
    """The URL the client of one request may read its energy at."""
    return base.rstrip("/") + request_path(response_id, ref, sign(key, response_id, ref))


def operator_ok(token: str | None, authorization: str | None) -> bool:
    """True when the ``Authorization`` header carries the operator's bearer token."""
    if not token or not authorization:
        return False
    scheme, _, given = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                              token.encode())


def key_from_env(default_file: str | None = None) -> bytes | None:
    """The URL key the environment names (see the module docstring); None when there is none."""
    from wattprint.profiler.sidecar.paths import read_private

    value = os.environ.get(ENV_URL_KEY)
    if value:
        return value.strip().encode()
    path = os.environ.get(ENV_URL_KEY_FILE) or default_file
    if not path:
        return None
    try:
        data = read_private(path, 4096)
    except ConfigError:
        return None
    key = (data or b"").strip()
    return key if len(key) >= 32 else None


def operator_token_from(path: str | None) -> str | None:
    """The operator token: from the file ``path`` (private and ours), else ``WATTPRINT_OPERATOR_TOKEN``
    or the file ``WATTPRINT_OPERATOR_TOKEN_FILE``; None when none is configured."""
    from wattprint.profiler.sidecar.paths import read_private

    path = path or os.environ.get(ENV_OPERATOR_TOKEN_FILE)
    if path:
        data = read_private(path, 4096)
        if data is None:
            raise ConfigError(f"operator token file {path} does not exist")
        token = data.decode("utf-8", "replace").strip()
    else:
        token = (os.environ.get(ENV_OPERATOR_TOKEN) or "").strip()
    if token and len(token) < 16:
        raise ConfigError("the operator token must have at least 16 characters")
    return token or None
