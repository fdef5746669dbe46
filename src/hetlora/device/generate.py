"""Greedy next-turn responses of the host's model to held-out prompts: the input of ROUGE-L, the HetLoRA paper's
second metric (docs/algorithm.md §10, "ROUGE-L").

A held-out example is a conversation whose last assistant turn is the target (its labels); the prompt is every token
before that turn's first target token, the reference is the turn itself without its end-of-turn token. The model,
as the client kind set it up (global adapter at a rank, folded base), answers each prompt greedily until its
end-of-turn token or ``max_new_tokens``: deterministic, so the same run scores the same.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.federated import IGNORE, Example
from .evaluate import autocast


def prompt_and_reference(example: Example, end_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """The tokens before the target turn, and the target turn's tokens (its end-of-turn token left out)."""
    first = next((i for i, label in enumerate(example.labels) if label != IGNORE), None)
    if first is None:
        raise ValueError("a held-out example with no target tokens cannot be answered")
    reference = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    while reference and reference[-1] in end_ids:
        reference.pop()
    return example.input_ids[:first], reference


def greedy(max_new_tokens: int, end_ids: Sequence[int], pad_id: int):
    """A generation config that is the argmax and nothing else: a model's own generation_config.json (a repetition
    penalty, say) would otherwise be merged in even without sampling."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                            no_repeat_ngram_size=0, eos_token_id=list(end_ids), pad_token_id=pad_id)


def greedy_responses(model, examples: Sequence[Example], pad_id: int, end_ids: Sequence[int], max_new_tokens: int,
                     batch_size: int = 8, bf16: bool = False) -> list[list[int]]:
    """Each prompt's greedy continuation (token ids, up to its first end-of-turn token, which is left out)."""
    device = next(model.parameters()).device
    out: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            prompts = [prompt_and_reference(e, end_ids)[0] for e in examples[start : start + batch_size]]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):  # left-padded: every prompt ends where generation starts
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            with torch.no_grad(), autocast(device.type, bf16):
                generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=greedy(
                    max_new_tokens, end_ids, pad_id), use_cache=True)
            for row in generated[:, width:].tolist():
                cut = next((i for i, t in enumerate(row) if t in end_ids), len(row))
                out.append(row[:cut])
    finally:
        model.train(was_training)
    return out
