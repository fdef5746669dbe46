"""Greedy responses to held-out prompts (the input of ROUGE-L): the prompt/reference split by hand, and the batched,
left-padded, cached generation against a step-by-step argmax loop over the whole sequence (no cache, no padding)."""

import pytest
import torch

from hetlora.data.federated import IGNORE, Example
from hetlora.device.generate import greedy_responses, prompt_and_reference


def test_the_prompt_is_everything_before_the_target_turn_and_the_reference_is_the_turn_without_its_end():
    e = Example(input_ids=[5, 6, 7, 8, 9, 2], labels=[IGNORE, IGNORE, IGNORE, 8, 9, 2])
    assert prompt_and_reference(e, end_ids=[2]) == ([5, 6, 7], [8, 9])
    with pytest.raises(ValueError, match="no target tokens"):
        prompt_and_reference(Example([1, 2], [IGNORE, IGNORE]), end_ids=[2])


def argmax_loop(model, prompt, end_ids, steps):
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            if token in end_ids:
                break
            out.append(token)
            ids.append(token)
    return out


def test_batched_greedy_responses_are_the_step_by_step_argmax(tiny):
    model, tok = tiny
    end_ids = [tok.eos_token_id]
    prompts = [[1, 400, 401, 402, 403, 404, 405], [1, 900, 33], [1, 77, 78, 79, 80]]  # three lengths: left padding matters
    examples = [Example(p + [50, tok.eos_token_id], [IGNORE] * len(p) + [50, tok.eos_token_id]) for p in prompts]
    mode = model.training
    got = greedy_responses(model, examples, tok.pad_token_id, end_ids, max_new_tokens=6, batch_size=3)
    assert model.training == mode  # left as it was found
    model.eval()
    assert got == [argmax_loop(model, p, end_ids, 6) for p in prompts]
    assert all(len(r) <= 6 for r in got) and any(got)
