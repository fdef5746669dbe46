"""Seeds derived from names, so that randomness does not depend on the order things run in."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (SHA-256 of them joined by ':')."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63)
