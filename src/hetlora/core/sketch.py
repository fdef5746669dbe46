"""FSLoRA's sketches (Fang et al., arXiv 2501.19389; docs/algorithm.md "fslora"): which m of the r
global components a client trains this round, and gathering them.

Shared by the server (hetlora.methods.fslora re-derives what it sent) and the client kind
(hetlora.clients.fslora sends it), so it lives below both.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .adapter import A_SUFFIX, B_SUFFIX, Adapter, lora_pairs
from .seeds import derive_seed


def sketch_indices(seed: int, round_index: int, client_id: str, m: int, r: int) -> list[int]:
    """I_k: m of the r components, uniform without replacement, a pure function of (seed, round, client)."""
    if not 1 <= m <= r:
        raise ValueError(f"a sketch of {m} components does not fit rank {r}")
    g = torch.Generator().manual_seed(derive_seed("fslora", seed, round_index, client_id))
    return sorted(torch.randperm(r, generator=g)[:m].tolist())


def gather(adapter: Adapter, indices: Sequence[int]) -> Adapter:
    """B[:, I], A[I, :] for every module."""
    idx = torch.tensor(list(indices))
    out: Adapter = {}
    for module, b, a in lora_pairs(adapter):
        out[module + B_SUFFIX] = b[:, idx].clone()
        out[module + A_SUFFIX] = a[idx].clone()
    return out
