"""Small non-square adapters for tests: out ≠ in ≠ r, so a transposed factor fails."""

from __future__ import annotations

import torch

from hetlora.core.adapter import A_SUFFIX, B_SUFFIX, ClientUpdate

# module -> (out, in); neither square nor equal to any rank used in tests.
SHAPES = {"layers.0.q_proj": (7, 5), "layers.0.down_proj": (5, 11)}


def make_adapter(rank: int, seed: int = 0, shapes=SHAPES, b_scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, (o, i) in shapes.items():
        out[module + A_SUFFIX] = torch.randn(rank, i, generator=g, dtype=torch.float64)
        out[module + B_SUFFIX] = b_scale * torch.randn(o, rank, generator=g, dtype=torch.float64)
    return out


def make_update(rank: int, seed: int = 0, n: int = 10, cid: str | None = None, **kw) -> ClientUpdate:
    return ClientUpdate(make_adapter(rank, seed, **kw), n, client_id=cid if cid is not None else f"c{seed}")


def product(adapter, module):
    return adapter[module + B_SUFFIX] @ adapter[module + A_SUFFIX]


def train(host, kind: str, client_id: str, payload, rank: int, round_index: int = 0, prune: bool = False):
    """One client's local round through its client kind (what every engine calls)."""
    from hetlora.clients import Job, get_kind

    (update,) = get_kind(kind).train(host, [Job(client_id, rank, round_index, payload)], prune=prune)
    return update


def lora_logits_and_grads(model, adapter, ids, targets, rank: int):
    """Logits of ``model`` with ``adapter`` in a one-slot LoRA bank, and the factors' gradients of mean(logits²)."""
    from hetlora.device.lora import LoRABank

    bank = LoRABank(model, targets, slots=1, rank=rank)
    bank.load(0, adapter)
    for p in bank.factors():
        p.requires_grad_(True)
    with bank.use(1):
        logits = model(input_ids=ids).logits
        logits.float().square().mean().backward()
    grads = [p.grad.clone() for p in bank.factors()]
    bank.remove()
    return logits.detach(), grads
