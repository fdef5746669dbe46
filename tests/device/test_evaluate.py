
import pytest
import torch

from hetlora.data.federated import RawExample, tokenize_example
from hetlora.device.evaluate import chunked_cross_entropy, evaluate_loss


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


def test_chunked_cross_entropy_equals_the_whole_and_its_gradient(tiny):
    """Chunks of 3 tokens (each checkpointed) give every token's loss and the head's gradient of the unchunked loss."""
    model, _ = tiny
    head = model.get_output_embeddings()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, head.in_features, generator=g, requires_grad=True)
    labels = torch.randint(0, head.out_features, (10,), generator=g)
    whole = torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="none")
    (grad_whole,) = torch.autograd.grad(whole.sum(), hidden)
    chunked = chunked_cross_entropy(head, hidden, labels, chunk=3)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=1e-6, atol=1e-6)
