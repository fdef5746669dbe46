"""The merged export (hetlora.export.merged): the model the run evaluated, never over a run or a non-empty directory."""


import pytest
import torch

from hetlora.config import RunConfig


def base(out, **kw):
    return RunConfig(**(dict(
        model="tiny", rounds=2, clients_per_round=2, local_steps=1, batch_size=4, max_length=48, lr=5e-3,
        r_min=2, r_max=6, eval_size=8, min_examples=400, max_clients=8, out=str(out), seed=5,
    ) | kw))


def test_export_merged_model_matches_adapter(tmp_path):
    from peft import PeftModel

    from hetlora import load_base_model
    from hetlora.export.merged import export_merged
    from hetlora.server.runner import run

    out = tmp_path / "run"
    run(base(out), progress=False)
    merged_dir = export_merged(out, tmp_path / "merged")
    merged, _ = load_base_model(str(merged_dir))
    peft_model = PeftModel.from_pretrained(load_base_model("tiny")[0], str(out / "adapter"))
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_export_never_overwrites_the_run_or_a_non_empty_directory(tmp_path):
    from typer.testing import CliRunner

    from hetlora.cli import app
    from hetlora.server.runner import run

    out = tmp_path / "run"
    run(base(out, rounds=1), progress=False)
    config_before = (out / "config.json").read_bytes()
    runner = CliRunner()
    for target in (out, tmp_path):  # the run itself, and a directory containing it
        result = runner.invoke(app, ["export", str(out), "--merged", str(target), "--force"])
        assert result.exit_code == 2 and "run directory" in result.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    result = runner.invoke(app, ["export", str(out), "--merged", str(busy)])
    assert result.exit_code == 2 and "not empty" in result.output and (busy / "keep.txt").is_file()
    result = runner.invoke(app, ["export", str(out), "--merged", str(busy), "--force"])
    assert result.exit_code == 0 and (busy / "config.json").is_file() and not (busy / "keep.txt").exists()
    assert (out / "config.json").read_bytes() == config_before


def test_export_of_a_method_without_a_model_to_export_says_so(tmp_path):
    from hetlora.export.merged import export_merged
    from hetlora.server.runner import run

    out = tmp_path / "run"
    run(base(out, rounds=1, method="fft", clients_per_round=1), progress=False)
    with pytest.raises(ValueError, match="method fft ends with no LoRA adapter"):
        export_merged(out, tmp_path / "merged")


def final_model_logits(out, ids):
    """The logits of the model the run evaluated last: the host with the checkpoint's base delta and global adapter."""
    from hetlora.server.checkpoint import load_latest
    from hetlora.server.federation import Federation
    from hetlora.device.host import ClientHost
    from hetlora.server.runner import saved_config

    cfg = saved_config(out)
    _, tensors, _ = load_latest(out / "checkpoint", ("global",), Federation.CHECKPOINT_GROUPS)
    host = ClientHost(cfg)
    host.apply_base_delta(tensors.get("base_delta"), "final")
    with torch.no_grad():
        if get_kind_has_adapter(cfg):
            bank = host.bank()
            bank.load(0, tensors["global"])
            with bank.use(1, cfg.global_rank):
                return host.model(input_ids=ids).logits
        return host.model(input_ids=ids).logits


def get_kind_has_adapter(cfg):
    from hetlora.clients import get_kind
    from hetlora.methods import get_method

    return get_kind(get_method(cfg.method).client_kind).has_adapter


@pytest.mark.parametrize("method", ["fedex-lora", "flora", "florist"])
def test_the_merged_export_is_the_model_the_run_evaluated(tmp_path, method):
    """fedex-lora folds its residual into the base weights and flora all of its update: the merged export must
    fold the base delta too (the adapter alone is another model), and a GGUF adapter is refused with the reason."""
    from hetlora import load_base_model
    from hetlora.export.merged import export_merged
    from hetlora.export.gguf import export_gguf
    from hetlora.server.runner import run

    out = tmp_path / "run"
    run(base(out, method=method, precision="fp32"), progress=False)
    assert (out / "base_delta.safetensors").is_file()
    merged, _ = load_base_model(str(export_merged(out, tmp_path / "merged")))
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11]])
    with torch.no_grad():
        exported = merged(input_ids=ids).logits
    expected = final_model_logits(out, ids)
    torch.testing.assert_close(exported, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert float((exported - load_base_model("tiny")[0](input_ids=ids).logits).abs().max()) > 1e-3  # it did train
    with pytest.raises(ValueError, match="folded updates into the base weights"):
        export_gguf(out, tmp_path / "gguf")


def test_export_refuses_a_target_inside_the_run(tmp_path):
    from typer.testing import CliRunner

    from hetlora.cli import app
    from hetlora.server.runner import run

    out = tmp_path / "run"
    run(base(out, rounds=1), progress=False)
    plots = sorted(p.name for p in (out / "plots").iterdir())
    (tmp_path / "link").symlink_to(out / "plots")
    runner = CliRunner()
    for flag, target in (("--merged", out / "sub"), ("--gguf", out / "plots"), ("--gguf", tmp_path / "link")):
        result = runner.invoke(app, ["export", str(out), flag, str(target), "--force"])
        assert result.exit_code == 2 and "inside the run directory" in result.output, result.output
    assert not (out / "sub").exists() and sorted(p.name for p in (out / "plots").iterdir()) == plots


@pytest.mark.parametrize("content,message", [("{", "is not valid JSON"), ("[1, 2]", "does not hold a JSON object")])
def test_a_damaged_config_is_one_clear_error_for_export_and_resume(tmp_path, content, message):
    from hetlora.export.merged import finished_run
    from hetlora.server.runner import saved_config

    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match=f"^export: .*{message}"):
        finished_run(tmp_path)
    with pytest.raises(ValueError, match=f"^--resume: .*{message}"):
        saved_config(tmp_path)
