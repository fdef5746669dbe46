from typer.testing import CliRunner

from hetlora.cli import app, build_config


def test_low_memory_flags_reach_the_config():
    cfg = build_config(None, {"grad_checkpointing": True, "release_memory": True, "rounds": None})
    assert cfg.grad_checkpointing and cfg.release_memory and cfg.rounds == 5
    assert not build_config(None, {}).grad_checkpointing


def test_run_help_lists_the_low_memory_flags():
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--grad-checkpointing" in result.output and "--release-memory" in result.output


def test_target_modules_flag_is_a_comma_list():
    assert build_config(None, {"target_modules": "q_proj, v_proj"}).target_modules == ["q_proj", "v_proj"]
    assert build_config(None, {}).target_modules[0] == "q_proj" and len(build_config(None, {}).target_modules) == 7
