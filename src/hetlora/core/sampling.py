"""Which clients train in a round: a pure function of (seed, round), the same in every engine.

The DP accountant (hetlora.server.privacy) assumes the ``uniform`` scheme (K of N without replacement).
"""

from __future__ import annotations

import random
from typing import Sequence


def sample_clients(client_ids: Sequence[str], k: int, seed: int, round_index: int, scheme: str = "uniform") -> list[str]:
    """The clients of round ``round_index``, a pure function of (seed, round).

    ``uniform``: K clients uniformly without replacement. ``cyclic``: a seeded permutation of
    all clients per "epoch" of ceil(N/K) rounds, cut into rounds of K, so every client is
    trained exactly once per epoch (the last round of an epoch may have fewer).
    """
    ids = sorted(client_ids)
    if scheme == "cyclic":
        per_epoch = -(-len(ids) // k)
        epoch, slot = divmod(round_index, per_epoch)
        order = random.Random(f"cycle:{seed}:{epoch}").sample(ids, len(ids))
        return sorted(order[slot * k : (slot + 1) * k])
    return sorted(random.Random(f"sample:{seed}:{round_index}").sample(ids, min(k, len(ids))))
