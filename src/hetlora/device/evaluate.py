"""Held-out perplexity on target tokens, with the LM head applied only where a target is.

Computing logits only at the N target positions instead of all B·T positions cuts the
largest matrix product of a small LM (vocab × hidden) and the B·T·V logits tensor.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.federated import IGNORE, Example, collate
from ..models.quantised import QuantisedLinear, block_cross_entropy

CE_CHUNK = 256  # target tokens whose logits exist at once (256 × 49152 fp32 logits = 48 MiB for SmolLM2)


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def target_token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the batch: summed cross-entropy over its target tokens, and their count.

    The decoder runs on the whole batch; the LM head only on hidden states whose next
    token is a target (label ≠ -100).
    """
    inner = _unwrap(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else inner.base_model
    # use_cache=False: nothing is generated here, a KV cache would only hold memory
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    picked = labels != IGNORE
    per_token = chunked_cross_entropy(inner.get_output_embeddings(), hidden[:, :-1][picked], labels[picked])
    rows = picked.nonzero()[:, 0]
    n = labels.shape[0]
    loss = torch.zeros(n, device=per_token.device, dtype=per_token.dtype).index_add_(0, rows, per_token)
    count = torch.bincount(rows, minlength=n)
    return loss, count


def _token_losses(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="none")


def chunked_cross_entropy(head, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = CE_CHUNK) -> torch.Tensor:
    """Per-token cross-entropy of ``head(hidden)`` against ``labels``, ``chunk`` tokens at a time.

    The logits of all N target tokens (N × vocabulary, fp32) and the log-softmax autograd keeps
    for them were the largest tensors of a small LM's step (~120 MB each for SmolLM2 at batch
    8 × 128). Each chunk's loss is checkpointed when it needs a gradient: only its hidden rows
    are kept, and its logits are recomputed in backward (the LM head is a few % of a step), so at
    most one chunk's logits exist at a time. A head kept in GGUF blocks goes the other way round
    (:func:`hetlora.models.quantised.block_cross_entropy`): all tokens, a chunk of the vocabulary at a time, so
    its blocks are dequantised twice per step rather than three times per chunk of tokens.
    """
    if isinstance(head, QuantisedLinear):  # a head in GGUF blocks: one pass over the vocabulary, no logits kept
        return block_cross_entropy(head, hidden, labels)
    if len(labels) <= chunk:
        return _token_losses(head, hidden, labels)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    pieces = []
    for start in range(0, len(labels), chunk):
        h, y = hidden[start : start + chunk], labels[start : start + chunk]
        pieces.append(checkpoint(_token_losses, head, h, y, use_reentrant=False) if grad else _token_losses(head, h, y))
    return torch.cat(pieces)


def target_token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's target tokens, and their count."""
    loss, count = target_token_losses(model, batch)
    return loss.sum(), int(count.sum())


def autocast(device: str, bf16: bool):
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else nullcontext()


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], pad_id: int, batch_size: int = 16, bf16: bool = False) -> float:
    """Mean target-token cross-entropy over ``examples`` (perplexity = exp of it)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device.type, bf16):
            loss, n = target_token_loss(model, batch)
        total += float(loss)
        count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("no target tokens to evaluate")
    return total / count


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
