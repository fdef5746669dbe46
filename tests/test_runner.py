import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hetlora.config import RunConfig
from hetlora.core.adapter import B_SUFFIX
from hetlora.runner import run

TIMING_KEYS = {"seconds", "client_seconds", "eval_seconds", "peak_rss_mb", "server_rss_mb"}


def tiny_config(out, **kw):
    base = dict(
        model="tiny", rounds=2, clients_per_round=3, local_steps=2, batch_size=4, max_length=48, lr=5e-3,
        r_min=2, r_max=6, eval_size=8, min_examples=400, max_clients=12, out=str(out), seed=7,
    )
    base.update(kw)
    return RunConfig(**base)


def rows(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def strip_timing(r):
    return {k: v for k, v in r.items() if k not in TIMING_KEYS}


def test_end_to_end_outputs_and_adapter_loads(tmp_path):
    out = tmp_path / "run"
    summary = run(tiny_config(out), progress=False)
    metrics = rows(out)
    assert [r["round"] for r in metrics] == [1, 2]
    for r in metrics:
        for key in ("method", "eval_loss", "eval_ppl", "train_loss", "ranks", "bytes_up", "bytes_down", "seconds", "dropped"):
            assert key in r, key
        assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]))
        assert all(2 <= v <= 6 for v in r["ranks"].values())
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    assert "tier_eval_ppl" in metrics[-1]
    assert summary["final_eval_ppl"] == metrics[-1]["eval_ppl"]
    for name in ("perplexity.png", "ranks.png", "bytes.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 12
    from peft import PeftModel

    from hetlora import load_base_model

    base, _ = load_base_model("tiny")
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    key = next(k for k in saved if k.endswith(B_SUFFIX))
    module = dict(model.named_modules())[key[: -len(".lora_B.weight")]]
    torch.testing.assert_close(module.lora_B["default"].weight, saved[key])
    assert saved[key].abs().sum() > 0  # trained, not the zero init


def test_same_seed_same_numbers_and_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(tiny_config(a), progress=False)
    run(tiny_config(b), progress=False)
    assert [strip_timing(r) for r in rows(a)] == [strip_timing(r) for r in rows(b)]
    assert (a / "adapter" / "adapter_model.safetensors").read_bytes() == (b / "adapter" / "adapter_model.safetensors").read_bytes()


def test_low_memory_options_change_memory_not_numbers(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(tiny_config(a, rounds=1), progress=False)
    run(tiny_config(b, rounds=1, grad_checkpointing=True, release_memory=True), progress=False)
    (ra,), (rb,) = rows(a), rows(b)
    assert ra["ranks"] == rb["ranks"] and ra["clients"] == rb["clients"]
    assert rb["eval_loss"] == pytest.approx(ra["eval_loss"], rel=1e-5)
    assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)


def test_target_modules_choose_what_lora_wraps(tmp_path):
    out = tmp_path / "qv"
    run(tiny_config(out, rounds=1, target_modules=["q_proj", "v_proj"]), progress=False)
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {k.split(".")[-3] for k in saved} == {"q_proj", "v_proj"}
    assert len(saved) == 2 * 2 * 2  # 2 layers x 2 modules x (A, B)
    assert set(json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]) == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="c_attn"):
        run(tiny_config(tmp_path / "gpt2-names", rounds=1, target_modules=["c_attn"]), progress=False)


def test_resume_is_bit_identical_and_survives_a_corrupt_checkpoint(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run(tiny_config(full, rounds=3, method="hetlora"), progress=False)
    run(tiny_config(part, rounds=2, method="hetlora"), progress=False)
    # the newest checkpoint is damaged: resume must detect it and use round 1
    newest = sorted((part / "checkpoint").glob("round-*"))[-1]
    with open(newest / "global.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00garbage\x00")
    from hetlora.runner import resume_config

    run(resume_config(part, given={"rounds": 3}), resume=True, progress=False)
    assert [r["round"] for r in rows(part)] == [1, 2, 3]
    assert [strip_timing(r) for r in rows(part)] == [strip_timing(r) for r in rows(full)]
    assert (part / "adapter" / "adapter_model.safetensors").read_bytes() == (full / "adapter" / "adapter_model.safetensors").read_bytes()


def test_bad_updates_are_dropped_and_round_goes_on(tmp_path):
    def poison(t, updates):
        bad = updates[0]
        key = next(iter(bad.adapter))
        bad.adapter[key] = bad.adapter[key].clone()
        bad.adapter[key][0, 0] = float("nan")
        return updates + [updates[1]]  # and a duplicate

    out = tmp_path / "run"
    run(tiny_config(out, rounds=1), progress=False, hook=poison)
    (row,) = rows(out)
    reasons = [d["reason"] for d in row["dropped"]]
    assert any("NaN" in r for r in reasons) and any("more than one" in r for r in reasons)
    assert row["aggregated"] and len(row["clients"]) == 2


def test_too_few_valid_updates_keep_the_previous_global(tmp_path):
    def drop_all(t, updates):
        for u in updates:
            u.num_examples = 0
        return updates

    out = tmp_path / "run"
    summary = run(tiny_config(out, rounds=1, min_clients=1), progress=False, hook=drop_all)
    (row,) = rows(out)
    assert not row["aggregated"] and len(row["dropped"]) == 3
    assert row["eval_ppl"] == pytest.approx(summary["initial_eval_ppl"])  # B still zero


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"method": "nope"}, "unknown method"),
        ({"r_min": 9, "r_max": 4}, "r_min"),
        ({"method": "fedavg", "rank": 99}, "rank 99"),
        ({"data": "/no/such/file.jsonl"}, "neither"),
        ({"rank_dist": "list"}, "needs ranks"),
        ({"target_modules": []}, "target_modules"),
    ],
)
def test_bad_configs_fail_before_loading(tmp_path, changes, message):
    t = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        run(tiny_config(tmp_path / "x", **changes), progress=False)
    assert time.perf_counter() - t < 1.0


def test_refuses_to_overwrite_a_run(tmp_path):
    out = tmp_path / "run"
    run(tiny_config(out, rounds=1), progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        run(tiny_config(out, rounds=1), progress=False)


def test_sigkill_mid_round_then_resume(tmp_path):
    """Kill the CLI with SIGKILL during round 3, resume: no round lost or repeated, same adapter."""
    args = ["--model", "tiny", "--rounds", "4", "--clients-per-round", "3", "--local-steps", "3", "--batch-size", "4",
            "--max-length", "48", "--r-min", "2", "--r-max", "6", "--eval-size", "8", "--max-clients", "12", "--min-examples", "400", "--seed", "3", "--quiet"]
    cli = [sys.executable, "-m", "hetlora.cli", "run"]
    env = dict(os.environ)
    ref = tmp_path / "ref"
    subprocess.run(cli + args + ["--out", str(ref)], check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cli + args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # now inside round 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len((out / "metrics.jsonl").read_text().splitlines())
    assert done_before < 4, "the run finished before it could be killed"
    subprocess.run(cli + ["--resume", "--out", str(out), "--quiet"], check=True, env=env, capture_output=True)
    assert [r["round"] for r in rows(out)] == [1, 2, 3, 4]
    assert [strip_timing(r) for r in rows(out)] == [strip_timing(r) for r in rows(ref)]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (ref / "adapter" / "adapter_model.safetensors").read_bytes()


def test_dp_mode_reports_epsilon_each_round(tmp_path, caplog):
    out = tmp_path / "dp"
    with caplog.at_level("WARNING"):
        run(tiny_config(out, dp_clip=0.5, dp_noise=1.0), progress=False)
    metrics = rows(out)
    eps = [r["dp_epsilon"] for r in metrics]
    assert 0 < eps[0] < eps[1] and all(r["dp_delta"] == 1e-5 for r in metrics)
    assert "sparsity weighting is off" in caplog.text
