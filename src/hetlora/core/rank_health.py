"""How much of its rank a global adapter really uses (docs/algorithm.md, "Live rank").

Zero-padded factor averaging sets component j of the global adapter to zero in both
factors whenever no client of a round had rank > j; with A_j = 0 and B_:,j = 0 both
gradients are zero, so the component never trains again. The *live rank* counts the
components still alive (both factors non-zero), the *trainable rank* those that still receive
a gradient (either factor non-zero); the *rank energy* says where ΔW's energy sits.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from .adapter import lora_pairs, product_norm_sq


def component_strengths(adapter: Mapping[str, Tensor]) -> Tensor:
    """s_j = Σ_ℓ ‖B_ℓ[:, j]‖ · ‖A_ℓ[j, :]‖ for every component j (float64)."""
    total: Tensor | None = None
    for _, b, a in lora_pairs(adapter):
        s = torch.linalg.vector_norm(b.detach().double(), dim=0) * torch.linalg.vector_norm(a.detach().double(), dim=1)
        total = s if total is None else total + s
    if total is None:
        raise ValueError("adapter has no LoRA pairs")
    return total


def live_rank(adapter: Mapping[str, Tensor]) -> int:
    """#{j : Σ_ℓ ‖B_ℓ[:, j]‖·‖A_ℓ[j, :]‖ > 0}: components that can still change ΔW."""
    return int((component_strengths(adapter) > 0).sum())


def trainable_rank(adapter: Mapping[str, Tensor]) -> int:
    """#{j : B[:, j] ≠ 0 or A[j, :] ≠ 0 in some module}: components that receive a gradient.

    A component with one factor zero still trains (LoRA's own init has B = 0, so a fresh
    adapter is trainable at full rank and live at 0); one with both zero never trains again.
    """
    total: Tensor | None = None
    for _, b, a in lora_pairs(adapter):
        s = (b.detach() != 0).any(dim=0) | (a.detach() != 0).any(dim=1)
        total = s if total is None else total | s
    if total is None:
        raise ValueError("adapter has no LoRA pairs")
    return int(total.sum())


def slice_energy(adapter: Mapping[str, Tensor], start: int, stop: int) -> float:
    """Σ_ℓ ‖B_ℓ[:, S] A_ℓ[S, :]‖_F² for the component slice S = [start, stop) (trace identity)."""
    return sum(float(product_norm_sq(b[:, start:stop].detach(), a[start:stop].detach())) for _, b, a in lora_pairs(adapter))


def rank_energy(adapter: Mapping[str, Tensor], r_min: int, r_mid: int, r_max: int) -> dict[str, float]:
    """Shares of ΔW's energy in slices [0, r_min), [r_min, r_mid), [r_mid, r_max].

    Each slice's energy is that of ΔW restricted to it; the shares are normalised by
    their sum (cross terms between slices are left out), so they add up to 1.
    """
    bounds = {"low": (0, r_min), "mid": (r_min, r_mid), "high": (r_mid, r_max)}
    energies = {name: slice_energy(adapter, lo, hi) if hi > lo else 0.0 for name, (lo, hi) in bounds.items()}
    total = sum(energies.values())
    shares = {name: (e / total if total > 0 else 0.0) for name, e in energies.items()}
    return shares | {"bounds": [r_min, r_mid, r_max]}


RANK_TOL = 1e-6


def refactor_by_svd(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """(B', A') with B'A' = BA and components ordered by singular value, without forming the out × in product.

    B = Q_b R_b and Aᵀ = Q_a R_a (reduced QR), so BA = Q_b (R_b R_aᵀ) Q_aᵀ; the SVD of the small
    core R_b R_aᵀ = U_c Σ V_cᵀ gives BA = (Q_b U_c) Σ (Q_a V_c)ᵀ, and B' = Q_b U_c √Σ, A' = √Σ V_cᵀ Q_aᵀ
    (docs/algorithm.md §3). Truncating (B', A') to r components is then the best rank-r approximation
    of BA (Eckart–Young). Components beyond the product's numerical rank (σ ≤ 1e-6·σ₁) come out zero,
    so they count as dead (and ``revive`` restores them). float64 inside, fp32 out.
    """
    r = a.shape[0]
    q_b, r_b = torch.linalg.qr(b.detach().double(), mode="reduced")
    q_a, r_a = torch.linalg.qr(a.detach().double().T, mode="reduced")
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    if sigma.numel() and sigma[0] > 0:  # numerical rank: below 1e-6·σ₁ is the rounding of fp32 factors, not a component
        sigma = torch.where(sigma > RANK_TOL * sigma[0], sigma, torch.zeros_like(sigma))
    root = sigma.clamp(min=0).sqrt()
    new_b = torch.zeros(b.shape[0], r, dtype=torch.float64)
    new_a = torch.zeros(r, a.shape[1], dtype=torch.float64)
    k = sigma.shape[0]
    new_b[:, :k] = (q_b @ u) * root
    new_a[:k] = root[:, None] * (vh @ q_a.T)
    return new_b.float(), new_a.float()


def revive(b: Tensor, a: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, int]:
    """Give every component whose A row and B column are both zero a fresh A row (LoRA's init: U(±1/√in)), B column 0.

    ΔW = BA is unchanged exactly (the B column stays zero), and the component now receives a gradient on B
    the next time a client of higher rank trains it. Returns (B, A, how many were revived).
    """
    dead = ((b.detach() == 0).all(dim=0) & (a.detach() == 0).all(dim=1)).nonzero().flatten()
    if dead.numel() == 0:
        return b, a, 0
    bound = 1.0 / math.sqrt(a.shape[1])
    fresh = (torch.rand(dead.numel(), a.shape[1], generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound)
    a = a.clone()
    a[dead] = fresh.to(a.dtype)
    return b, a, int(dead.numel())
