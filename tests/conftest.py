import pytest


@pytest.fixture(scope="session")
def tiny():
    """The tiny random Llama and the SmolLM2 tokenizer (deterministic, ~0.4 s)."""
    from hetlora.models import load_base_model

    return load_base_model("tiny")


@pytest.fixture(scope="session")
def chitchat_small(tiny):
    """Chitchat restricted to a few senders by a high min-examples filter."""
    from hetlora.data import load_data

    _, tok = tiny
    return load_data("chitchat", tok, min_examples=400, max_length=48, eval_size=12, seed=0)
