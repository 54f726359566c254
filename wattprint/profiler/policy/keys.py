"""Which stratum a request gets: its API key's strata, else the strata any client may claim.

An operator maps API keys to the strata they may use (the first one is the key's default). A key is
kept only as its SHA-256 digest: a policy file may give ``sha256:<64 hex>`` (``printf %s KEY |
sha256sum``) or the key itself, which is hashed as it is read. A request's claim (``X-Wattprint-Stratum``
or ``vllm_xargs.stratum``) is honoured only when it names a stratum its key (or, without a mapped key,
anyone) may use; otherwise the request gets the default and the refusal is reported, so that a client
cannot pick a privileged stratum by itself. Claims are normalised (:func:`~wattprint.profiler.core.strata.normalize`):
unknown or oversized values become ``unclassified``, nothing raw is kept.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from types import MappingProxyType

from wattprint.profiler.core.strata import UNCLASSIFIED, normalize

#: longer claims and keys are not looked at (a stratum name is short; a key is at most a few hundred bytes)
MAX_CLAIM_CHARS = 64
MAX_KEY_BYTES = 4096
_PREFIX = "sha256:"


def key_digest(key: str | bytes) -> bytes:
    """The SHA-256 digest under which an API key is kept."""
    return hashlib.sha256(key.encode("utf-8") if isinstance(key, str) else key).digest()


def parse_key(entry: str) -> bytes:
    """A policy file's key entry: ``sha256:<64 hex>`` or the key itself. Raises ValueError."""
    if not entry:
        raise ValueError("an API key must not be empty")
    if entry.startswith(_PREFIX):
        hexpart = entry[len(_PREFIX):]
        if len(hexpart) != 64:
            raise ValueError("a sha256: key needs 64 hex digits")
        return bytes.fromhex(hexpart)
    return key_digest(entry)


def bearer_token(authorization: bytes | str | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (None when absent or oversized)."""
    if authorization is None:
        return None
    raw = authorization.encode("latin-1") if isinstance(authorization, str) else bytes(authorization)
    if len(raw) > MAX_KEY_BYTES:
        return None
    scheme, _, token = raw.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


def claimed_stratum(value: bytes | str | None) -> str | None:
    """A client's claim as a bounded stratum value (None when it made none)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        if len(value) > MAX_CLAIM_CHARS:
            return UNCLASSIFIED
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return UNCLASSIFIED
    if len(value) > MAX_CLAIM_CHARS:
        return UNCLASSIFIED
    value = value.strip()
    return normalize(value) if value else None


@dataclass(frozen=True)
class Assignment:
    """The stratum a request gets, and why a claim was not honoured (``refused``: None, ``unknown``
    for a value that is not a configured stratum, ``not_allowed`` for one its key may not use)."""

    stratum: str
    refused: str | None = None
    keyed: bool = False


class KeyMap:
    """API key digests -> the strata each key may use (first = default). Immutable once built."""

    def __init__(self, entries: dict[bytes, tuple[str, ...]], claimable: frozenset[str], default: str):
        self._entries = MappingProxyType({k: (frozenset(v), v[0]) for k, v in entries.items()})
        self.claimable = frozenset(claimable)
        self.default = default

    def __len__(self) -> int:
        return len(self._entries)

    def assign(self, api_key: bytes | str | None, claim: bytes | str | None) -> Assignment:
        """The stratum for a request with this API key (raw token, or None) and this claim (raw)."""
        allowed, default, keyed = self.claimable, self.default, False
        if api_key is not None and len(api_key) <= MAX_KEY_BYTES:
            found = self._entries.get(key_digest(api_key))
            if found is not None:
                (allowed, default), keyed = found, True
        stratum = claimed_stratum(claim)
        if stratum is None:
            return Assignment(default, None, keyed)
        if stratum == UNCLASSIFIED and not _names_unclassified(claim):
            return Assignment(default, "unknown", keyed)
        if stratum == default or stratum in allowed:
            return Assignment(stratum, None, keyed)
        return Assignment(default, "not_allowed", keyed)


def _names_unclassified(claim: bytes | str | None) -> bool:
    if isinstance(claim, bytes):
        claim = claim[:MAX_CLAIM_CHARS + 1].decode("latin-1")
    return isinstance(claim, str) and claim.strip().lower() == UNCLASSIFIED
