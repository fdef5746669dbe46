"""Which m of the r global components a client trains this round, and gathering them: FSLoRA's sketches
(Fang et al., arXiv 2501.19389; docs/algorithm.md "fslora") and Fed-PLoRA's selection (docs/algorithm.md
"fed-plora"), each drawn from its own stream.

Shared by the server (hetlora.methods.fslora and fed_plora re-derive what a client trained) and the client kinds
(hetlora.clients.fslora, plora), so it lives below both.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .adapter import A_SUFFIX, B_SUFFIX, Adapter, lora_pairs
from .seeds import derive_seed


def sketch_indices(seed: int, round_index: int, client_id: str, m: int, r: int, stream: str = "fslora") -> list[int]:
    """I_k: m of the r components, uniform without replacement, a pure function of (seed, round, client) and
    the method's ``stream`` (FSLoRA's sketches and Fed-PLoRA's selections are independent draws)."""
    if not 1 <= m <= r:
        raise ValueError(f"a sketch of {m} components does not fit rank {r}")
    g = torch.Generator().manual_seed(derive_seed(stream, seed, round_index, client_id))
    return sorted(torch.randperm(r, generator=g)[:m].tolist())


def gather(adapter: Adapter, indices: Sequence[int]) -> Adapter:
    """B[:, I], A[I, :] for every module."""
    idx = torch.tensor(list(indices))
    out: Adapter = {}
    for module, b, a in lora_pairs(adapter):
        out[module + B_SUFFIX] = b[:, idx].clone()
        out[module + A_SUFFIX] = a[idx].clone()
    return out


def complement(indices: Sequence[int], r: int) -> list[int]:
    """The components of rank ``r`` not in ``indices``, in order."""
    chosen = set(indices)
    return [j for j in range(r) if j not in chosen]


PLORA_STREAM = "fed-plora"  # the seed stream of Fed-PLoRA's selections


def selected_modules(seed: int, round_index: int, client_id: str, rank: int, r: int) -> list[int]:
    """Fed-PLoRA's K_k: the ``rank`` of the ``r`` global rank-1 modules client ``client_id`` trains this round
    (the others are folded into its frozen weights)."""
    return sketch_indices(seed, round_index, client_id, rank, r, stream=PLORA_STREAM)
