
import pytest
import torch

from hetlora.data.federated import RawExample, tokenize_example
from hetlora.evaluate import evaluate_loss, greedy_responses, rouge_l


def test_target_only_loss_equals_full_logits_loss_on_targets(tiny):
    model, tok = tiny
    examples = [tokenize_example(RawExample((("user", f"question {i}"),), f"answer number {i}"), tok, 48) for i in range(5)]
    ours = evaluate_loss(model, examples, tok.pad_token_id, batch_size=2)
    total, count = 0.0, 0
    for e in examples:  # independent reference: HF's own loss with labels, one example at a time
        ids = torch.tensor([e.input_ids])
        labels = torch.tensor([e.labels])
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    assert ours == pytest.approx(total / count, rel=1e-5)


def test_rouge_l_known_values():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l(["dogs bark"], ["the cat sat"]) == 0.0
    # LCS "the cat" of 2 tokens: P = 2/2, R = 2/3 -> F = 0.8
    assert rouge_l(["the cat"], ["the cat sat"]) == pytest.approx(0.8)


def test_greedy_responses_are_deterministic(tiny):
    model, tok = tiny
    prompts = [[{"role": "user", "content": "hi"}]]
    a = greedy_responses(model, tok, prompts, max_new_tokens=5)
    b = greedy_responses(model, tok, prompts, max_new_tokens=5)
    assert a == b and isinstance(a[0], str)
