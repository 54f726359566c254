"""vLLM's request-id formats, in one place (no vLLM import: the sidecar and the HTTP middleware use it).

vLLM turns the OpenAI response id ``chatcmpl-X`` / ``cmpl-X`` into engine request ids
``chatcmpl-X-<8 hex>``, ``cmpl-X-<prompt index>-<8 hex>``, and ``<i>_chatcmpl-X...`` for
parallel-sampling children (``n > 1``). vLLM >= 0.11 appends the ``-<8 hex>`` suffix to the id the
caller gave (``InputProcessor.assign_request_id``).
"""

from __future__ import annotations

import re

#: OpenAI endpoint -> the prefix of the response ids vLLM gives its answers
RESPONSE_ID_PREFIXES = {"/v1/completions": "cmpl-", "/v1/chat/completions": "chatcmpl-"}

_HEX = frozenset("0123456789abcdef")
_ENGINE_SUFFIX = re.compile(r"-[0-9a-f]{8}$")  # vLLM >= 0.11 appends "-<8 hex>" to external ids
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
    rid = engine_id
    for pattern, repl in ((_ENGINE_SUFFIX, ""), (_CHILD_PREFIX, ""), (_PROMPT_INDEX, r"\1")):
        new = pattern.sub(repl, rid)
        if new != rid and new:
            out.append(new)
            rid = new
    return out
