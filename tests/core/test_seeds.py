"""Seeds derived from names: a pure function of the parts, 63 bits, different parts give different seeds."""

import hashlib

from hetlora.core.seeds import derive_seed


def test_derive_seed_is_the_sha256_of_the_joined_parts():
    expected = int.from_bytes(hashlib.sha256(b"sample:0:3").digest()[:8], "big") % 2**63
    assert derive_seed("sample", 0, 3) == expected
    assert derive_seed("sample", 0, 3) == derive_seed("sample", "0", "3")  # parts are joined as text


def test_derived_seeds_fit_63_bits_and_do_not_collide_over_a_run():
    seeds = {derive_seed("client", c, r) for c in range(50) for r in range(40)}
    assert len(seeds) == 2000 and all(0 <= s < 2**63 for s in seeds)
