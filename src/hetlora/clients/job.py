"""What the server sends a client for one round (:class:`Job`) and the server's global state (:data:`State`).

The bottom of the clients package: kinds, engines and the Flower apps all import it, it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

State = dict[str, dict[str, Tensor]]


@dataclass
class Job:
    """One client's task for one round, as the server sends it.

    ``payload``: the tensors of its kind (LoRA: the truncated global adapter);
    ``base``: the cumulative update folded into the frozen weights (empty for most
    methods) and ``base_version``, the round that last changed it.
    """

    client_id: str
    rank: int
    round: int
    payload: dict[str, Tensor]
    base: dict[str, Tensor] = field(default_factory=dict)
    base_version: int = 0
