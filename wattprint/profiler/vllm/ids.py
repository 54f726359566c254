"""vLLM's request-id formats, in one place.

Nothing here imports vLLM: the sidecar and the HTTP middleware use this module without it.

* The OpenAI server gives its answers the response ids ``chatcmpl-<X>`` (``/v1/chat/completions``) and
  ``cmpl-<X>`` (``/v1/completions``), ``<X>`` from the ``X-Request-Id`` header, else the body's
  ``request_id``, else a random uuid (:data:`RESPONSE_ID_PREFIXES`).
* It hands the engine the request ids ``chatcmpl-<X>`` and ``cmpl-<X>-<prompt index>``;
  ``LLM.generate`` hands it ``RequestOutput.request_id`` (``"0"``, ``"1"``, ...). Parallel-sampling
  children (``n > 1``) get the prefix ``"<index>_"``.
* Recent vLLM (whose ``EngineCoreRequest`` has an ``external_req_id`` field, >= 0.11) appends ``-`` and
  8 random lower-case hex digits to that id (``InputProcessor.assign_request_id``), unless
  ``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION`` is set (to anything but ``0``). Step records carry that
  engine id whole (two requests sent with one ``X-Request-Id`` stay apart); the sidecar maps an engine
  id back to every client-visible id it answers to (:func:`request_aliases`, with
  :func:`strip_random_suffix`), once per request.
"""

from __future__ import annotations

import re

#: OpenAI endpoint -> the prefix of the response ids vLLM gives its answers
RESPONSE_ID_PREFIXES = {"/v1/completions": "cmpl-", "/v1/chat/completions": "chatcmpl-"}

_HEX = frozenset("0123456789abcdef")
_CHILD_PREFIX = re.compile(r"^\d+_")  # parallel sampling (n > 1): "<index>_<parent id>"
_PROMPT_INDEX = re.compile(r"^(cmpl-.+)-\d+$")  # /v1/completions: "<response id>-<prompt index>"


def strip_random_suffix(rid: str) -> str:
    """``"{external}-{8 hex}"`` -> ``"{external}"`` (vLLM's internal request id -> the client's)."""
    if len(rid) > 9 and rid[-9] == "-" and _HEX.issuperset(rid[-8:]):
        return rid[:-9]
    return rid


def request_aliases(engine_id: str) -> list[str]:
    """The client-visible ids an engine request id answers to, most specific first."""
    out = []
    rid = strip_random_suffix(engine_id)
    if rid != engine_id:
        out.append(rid)
    for pattern, repl in ((_CHILD_PREFIX, ""), (_PROMPT_INDEX, r"\1")):
        new = pattern.sub(repl, rid)
        if new != rid and new:
            out.append(new)
            rid = new
    return out
