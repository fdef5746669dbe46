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
from hetlora.server.runner import run

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
    for name in ("perplexity.png", "ranks.png", "bytes.png", "live_rank.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    # integer round ticks only (ranks.png had 1.5, 2.5): the locator the plots use on their round axis
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from hetlora.server.plots import integer_rounds

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    integer_rounds(ax)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 2]
    plt.close(fig)
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator) and all(float(t).is_integer() for t in ticks) and ticks
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
    from hetlora.server.runner import resume_config

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
def test_bad_configs_fail_before_loading(tmp_path, changes, message, monkeypatch):
    from hetlora.models import loading as models

    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("the model loaded before the config was checked"))
    with pytest.raises(ValueError, match=message):
        run(tiny_config(tmp_path / "x", **changes), progress=False)


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
    ref_log = open(tmp_path / "ref.log", "w")  # a file, not a pipe: a full pipe would stall the run
    reference = subprocess.Popen(cli + args + ["--out", str(ref)], env=env, stdout=ref_log, stderr=subprocess.STDOUT)  # beside it
    out = tmp_path / "killed"
    proc = subprocess.Popen(cli + args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: on shared cores two rounds can take minutes (it leaves as soon as they are in)
    m = out / "metrics.jsonl"
    while time.time() < deadline and not (m.is_file() and len(m.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    assert m.is_file() and len(m.read_text().splitlines()) >= 2, "two rounds did not finish within 10 minutes"
    time.sleep(0.3)  # now inside round 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len((out / "metrics.jsonl").read_text().splitlines())
    assert done_before < 4, "the run finished before it could be killed"
    subprocess.run(cli + ["--resume", "--out", str(out), "--quiet"], check=True, env=env, capture_output=True)
    assert reference.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    ref_log.close()
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


# ---------------------------------------------------------------------------------- run directories
def test_resume_writes_to_the_directory_given_not_the_one_recorded(tmp_path):
    """Copy a run and resume the copy: the copy grows, the original is untouched; a moved run resumes."""
    import shutil

    from hetlora.server.runner import resume_config

    original = tmp_path / "original"
    run(tiny_config(original, rounds=1), progress=False)
    before = {p.name: p.read_bytes() for p in [original / "metrics.jsonl", original / "summary.json"]}
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    run(resume_config(copy, given={"rounds": 2}), resume=True, progress=False)
    assert [r["round"] for r in rows(copy)] == [1, 2]
    assert {p.name: p.read_bytes() for p in [original / "metrics.jsonl", original / "summary.json"]} == before
    moved = tmp_path / "moved"
    shutil.move(str(original), moved)
    run(resume_config(moved, given={"rounds": 2}), resume=True, progress=False)
    assert [r["round"] for r in rows(moved)] == [1, 2]
    assert "out" not in json.loads((moved / "config.json").read_text())


def test_resume_refuses_changed_settings_and_lower_rounds(tmp_path):
    from hetlora.server.runner import resume_config

    out = tmp_path / "run"
    run(tiny_config(out, rounds=2), progress=False)
    with pytest.raises(ValueError, match=r"lr: 0.005 → 0.1; seed: 7 → 8 \(only --rounds may be raised\)"):
        resume_config(out, given={"lr": 0.1, "seed": 8, "rounds": 3})
    with pytest.raises(ValueError, match="rounds can only be raised"):
        resume_config(out, given={"rounds": 1})
    assert resume_config(out, given={"rounds": 4, "lr": 5e-3}).rounds == 4  # unchanged values are fine
    with pytest.raises(ValueError, match="does not exist"):
        resume_config(tmp_path / "nowhere")


def test_resuming_a_run_whose_saved_settings_a_later_rule_refuses_says_so(tmp_path):
    """A run made before a rule (here: `rank` set for hetlora, accepted and ignored then) is not resumed under the new
    rules as if nothing changed, and not with a bare "invalid configuration": the message names why."""
    from hetlora.server.runner import resume_config

    out = tmp_path / "run"
    run(tiny_config(out, rounds=1), progress=False)
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(saved | {"rank": 3}))
    with pytest.raises(ValueError, match=r"saved settings of .* are refused now \(invalid configuration: rank sets the one rank"):
        resume_config(out, given={"rounds": 2})


def test_a_second_run_on_a_locked_directory_refuses(tmp_path):
    from hetlora.server.runner import run_lock

    out = tmp_path / "run"
    with run_lock(out):
        with pytest.raises(ValueError, match=r"in use by another hetlora run \(pid \d+\)"):
            run(tiny_config(out, rounds=1), progress=False)
    run(tiny_config(out, rounds=1), progress=False)  # free again
    assert len(rows(out)) == 1


def test_out_that_is_a_file_or_below_one(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(ValueError, match="is a file, not a directory"):
            run(tiny_config(out, rounds=1), progress=False)


def _checkpoint(out):
    return sorted((out / "checkpoint").glob("round-*"))[-1]


@pytest.mark.parametrize("damage", ["unlisted file", "empty manifest", "list manifest", "unexpected listed file"])
def test_the_checkpoint_manifest_covers_exactly_what_is_loaded(tmp_path, damage):
    """A damaged newest checkpoint is skipped (resume falls back one round and ends as an uninterrupted run)."""
    from hetlora.server.checkpoint import MANIFEST
    from hetlora.files import sha256
    from hetlora.server.runner import resume_config

    full, part = tmp_path / "full", tmp_path / "part"
    run(tiny_config(full, rounds=3), progress=False)
    run(tiny_config(part, rounds=2), progress=False)
    newest = _checkpoint(part)
    manifest = json.loads((newest / MANIFEST).read_text())
    if damage == "unlisted file":
        (newest / "base_delta.safetensors").write_bytes((newest / "global.safetensors").read_bytes())
    elif damage == "empty manifest":
        (newest / MANIFEST).write_text(json.dumps({"round": manifest["round"], "files": {}}))
    elif damage == "list manifest":
        (newest / MANIFEST).write_text("[]")
    else:
        (newest / "extra.safetensors").write_bytes(b"junk")
        manifest["files"]["extra.safetensors"] = sha256(newest / "extra.safetensors")
        (newest / MANIFEST).write_text(json.dumps(manifest))
    run(resume_config(part, given={"rounds": 3}), resume=True, progress=False)
    assert [strip_timing(r) for r in rows(part)] == [strip_timing(r) for r in rows(full)]


# ---------------------------------------------------------------------------------- non-finite results
def test_a_huge_client_of_two_cannot_swamp_the_round(tmp_path):
    """Two clients per round, one sends B × 1e30: with the default bound the global adapter stays finite
    and close to the honest one (the lower median is the honest client's norm)."""
    from hetlora.core.adapter import scale_adapter

    def inflate(t, updates):
        updates[0].adapter = scale_adapter(updates[0].adapter, b_scale=1e30)
        return updates

    out = tmp_path / "run"
    summary = run(tiny_config(out, rounds=1, clients_per_round=2), progress=False, hook=inflate)
    (row,) = rows(out)
    assert row["aggregated"] and not row["rejected"] and math.isfinite(row["eval_loss"])
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert max(float(v.abs().max()) for v in saved.values()) < 10
    assert summary["rejected_rounds"] == []


def test_a_non_finite_aggregate_is_never_applied_and_the_run_reports_failure(tmp_path):
    from hetlora.engines import failure

    def overflow(t, updates):  # finite factors whose product's SVD factors overflow fp32
        for u in updates:
            u.adapter = {k: torch.full_like(v, 1e30) for k, v in u.adapter.items()}
        return updates

    out = tmp_path / "run"
    summary = run(tiny_config(out, rounds=1, norm_bound=None, method="recon-svd"), progress=False, hook=overflow)
    (row,) = rows(out)
    assert not row["aggregated"] and "NaN or Inf" in row["rejected"]
    assert row["eval_ppl"] == pytest.approx(summary["initial_eval_ppl"])  # the initial global adapter kept
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())
    from hetlora.server.checkpoint import load_latest

    _, tensors, _ = load_latest(out / "checkpoint")
    assert all(torch.isfinite(v).all() for v in tensors["global"].values())
    assert summary["rejected_rounds"] == [1] and "was rejected" in failure(summary)


def test_cli_exits_non_zero_when_no_round_aggregated(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("min_clients = 50\n")
    args = ["--model", "tiny", "--rounds", "1", "--clients-per-round", "2", "--local-steps", "1", "--batch-size", "2",
            "--max-length", "32", "--eval-size", "4", "--max-clients", "4", "--min-examples", "400", "--r-min", "2", "--r-max", "4"]
    result = subprocess.run([sys.executable, "-m", "hetlora.cli", "run", "--config", str(config), "--out", str(tmp_path / "o"), "--quiet"] + args,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no round aggregated" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_errors_come_before_the_model_loads(tmp_path, monkeypatch):
    from hetlora.models import loading as models

    bad = tmp_path / "d.jsonl"
    bad.write_text('{"client_id": "a", "text": "ok"}\n{broken\n')
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("the model loaded before the data was checked"))
    with pytest.raises(ValueError, match="d.jsonl:2: bad JSON"):
        run(tiny_config(tmp_path / "o", data=str(bad), min_examples=1), progress=False)


def test_unknown_target_module_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"\['bogus_proj'\] not found"):
        run(tiny_config(tmp_path / "o", rounds=1, target_modules=["q_proj", "bogus_proj"]), progress=False)


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_client_whose_norm_is_not_finite_is_dropped_with_the_reason(tmp_path, per_layer):
    """float64 factors × 1e200 are finite, but ‖B A‖_F overflows even in float64: that client is
    dropped naming the reason, the others are aggregated."""
    from hetlora.core.adapter import scale_adapter

    def overflow(t, updates):
        updates[0].adapter = scale_adapter({k: v.double() for k, v in updates[0].adapter.items()}, b_scale=1e200)
        return updates

    out = tmp_path / "run"
    run(tiny_config(out, rounds=1, clients_per_round=3, per_layer=per_layer, norm_bound=None), progress=False, hook=overflow)
    (row,) = rows(out)
    assert len(row["dropped"]) == 1 and "not finite" in str(row["dropped"][0]), row["dropped"]
    assert row["aggregated"] and not row["rejected"] and math.isfinite(row["eval_loss"])


def test_the_run_lock_holds_against_another_process(tmp_path):
    """Two processes: a child holds the lock on --out; a run here refuses, naming the child's pid."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    code = ("import sys, time, pathlib; from hetlora.server.runner import run_lock\n"
            "with run_lock(pathlib.Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"in use by another hetlora run \(pid {child.pid}\)"):
            run(tiny_config(out, rounds=1), progress=False)
    finally:
        child.kill()
        child.wait()
    time.sleep(0.1)
    run(tiny_config(out, rounds=1), progress=False)  # the lock died with its process
    assert len(rows(out)) == 1


@pytest.mark.parametrize("method", ["hetlora", "hetlora-keep"])
def test_every_round_records_the_live_rank_and_zero_padding_kills_components(tmp_path, method):
    """Clients of ranks 2 and 3 under r_max 6: the live rank (‖B_j‖·‖A_j‖ > 0) is 3 in every round. Zero-padded
    averaging also zeroes the A rows above 3, so those components can never train again; hetlora-keep keeps
    their A rows (B is still 0: untrained, but alive for a client of higher rank)."""
    out = tmp_path / method
    run(tiny_config(out, method=method, rounds=2, clients_per_round=2, rank_dist="list", ranks=[2, 3], max_clients=2),
        progress=False)
    for row in rows(out):
        energy = row["rank_energy"]
        assert energy["low"] + energy["mid"] + energy["high"] == pytest.approx(1.0)
    assert [row["live_rank"] for row in rows(out)] == [3, 3]
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    tails = [float(v[3:].abs().max()) for k, v in saved.items() if k.endswith("lora_A.weight")]
    assert (max(tails) == 0.0) if method == "hetlora" else (min(tails) > 0.0)


# ---------------------------------------------------------------------------------- a finite but huge client
def all_huge(t, updates):
    """Round 1: client 0's every tensor is 1e30 (finite, so validation passes it)."""
    updates[0].adapter = {k: torch.full_like(v, 1e30) for k, v in updates[0].adapter.items()}
    return updates


@pytest.mark.parametrize("method", sorted(__import__("hetlora.methods", fromlist=["METHODS"]).METHODS))
def test_every_method_bounds_a_huge_client(tmp_path, method):
    """With the default bound, one client of 1e30s cannot poison any method's model: the round aggregates
    and the held-out loss stays finite (fslora, fedex-lora, ffa, flora and fft applied it before)."""
    from hetlora.engines import failure

    summary = run(tiny_config(tmp_path / "run", rounds=1, method=method, local_steps=1, eval_size=4), progress=False, hook=all_huge)
    (row,) = rows(tmp_path / "run")
    assert row["aggregated"] and not row["rejected"] and math.isfinite(row["eval_loss"]), row.get("rejected")
    assert row["eval_ppl"] < 2 * summary["initial_eval_ppl"]
    assert failure(summary) is None


@pytest.mark.parametrize("method", ["hetlora", "fedex-lora", "fslora", "fft"])
def test_without_the_bound_a_poisoned_model_is_rejected_and_the_run_fails(tmp_path, method):
    """Bound off: whatever the aggregate, a model whose held-out loss is not finite is never kept — the previous
    global model stays, the round says why, and the run reports failure (non-zero exit)."""
    from hetlora.server.checkpoint import load_latest
    from hetlora.engines import failure

    out = tmp_path / "run"
    summary = run(tiny_config(out, rounds=1, method=method, local_steps=1, eval_size=4, norm_bound=None), progress=False, hook=all_huge)
    (row,) = rows(out)
    assert math.isfinite(row["eval_loss"])
    if row["aggregated"]:  # fft: the loss stays finite (uniform predictions); bound off, only a non-finite loss is rejected
        assert failure(summary) is None
        return
    assert row["rejected"] and row["eval_ppl"] == pytest.approx(summary["initial_eval_ppl"])
    assert "was rejected" in failure(summary)
    _, tensors, _ = load_latest(out / "checkpoint", ("global",), ("global", "base_delta"))
    assert all(torch.isfinite(v).all() and float(v.abs().max()) < 1e6 for group in tensors.values() for v in group.values())


def test_settings_that_are_off_stay_off_when_a_run_is_read_back(tmp_path):
    """config.json holds null for a setting that is off (norm_bound, final_eval_size): read back, it must stay
    off, not become the default (a resumed `--norm-bound off` run silently bounded again)."""
    from hetlora.flower.common import config_from_run_config, encode_config
    from hetlora.server.runner import check_resumable, saved_config

    out = tmp_path / "run"
    cfg = tiny_config(out, rounds=1, norm_bound=None, final_eval_size=None, local_steps=1, eval_size=4)
    run(cfg, progress=False)
    assert saved_config(out).norm_bound is None and saved_config(out).settings() == cfg.settings()
    check_resumable(cfg)  # the same settings: accepted
    assert config_from_run_config({"hetlora-config": encode_config(cfg)}).norm_bound is None


# ---------------------------------------------------------------------------------- run hygiene
def test_a_planted_checkpoint_of_another_run_is_not_loaded(tmp_path, caplog):
    import shutil

    mine, other = tmp_path / "mine", tmp_path / "other"
    run(tiny_config(mine, rounds=1, local_steps=1, eval_size=4), progress=False)
    run(tiny_config(other, rounds=1, local_steps=1, eval_size=4, seed=8, method="fedavg"), progress=False)
    shutil.copytree(other / "checkpoint" / "round-00001", mine / "checkpoint" / "round-00007")
    from hetlora.server.runner import resume_config

    with caplog.at_level("WARNING"):
        run(resume_config(mine, given={"rounds": 2}), resume=True, progress=False)
    assert [r["round"] for r in rows(mine)] == [1, 2] and "belongs to another run" in caplog.text
    assert (mine / "checkpoint" / "round-00007").is_dir() and (mine / "checkpoint" / "round-00002").is_dir()


def test_a_torn_last_metrics_line_does_not_block_an_extension_and_the_extension_is_recorded(tmp_path):
    from hetlora.server.runner import resume_config

    out = tmp_path / "run"
    run(tiny_config(out, rounds=2, local_steps=1, eval_size=4), progress=False)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "eval_lo')  # a crash mid-write
    run(resume_config(out, given={"rounds": 3}), resume=True, progress=False)
    assert [r["round"] for r in rows(out)] == [1, 2, 3]
    saved = json.loads((out / "config.json").read_text())
    assert saved["rounds"] == 3 and saved["_run"]["rounds_history"] == [2, 3]
    with pytest.raises(ValueError, match="--rounds 2 is below the 3 round"):
        resume_config(out, given={"rounds": 2})


def test_a_run_that_failed_after_set_up_can_be_started_again_in_place(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="not found in the model"):
        run(tiny_config(out, rounds=1, target_modules=["nope"]), progress=False)
    assert (out / "config.json").is_file()  # the failure came after set-up
    run(tiny_config(out, rounds=1, local_steps=1, eval_size=4), progress=False)
    assert [r["round"] for r in rows(out)] == [1]
    with pytest.raises(ValueError, match="already holds a run"):  # one finished round: no longer restartable
        run(tiny_config(out, rounds=1), progress=False)


def test_a_rank_above_the_layers_dimensions_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="exceeds 32, the smallest dimension of the adapted layers"):
        run(tiny_config(tmp_path / "run", r_max=100_000), progress=False)


def test_a_data_file_is_recorded_by_hash_and_a_changed_file_refused_on_resume(tmp_path):
    from hetlora.config import build_config
    from hetlora.server.runner import resume_config

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"client_id": f"c{i % 3}", "prompt": f"q {i}", "response": f"answer {i}"}) + "\n"
                            for i in range(60)))
    out = tmp_path / "run"
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = build_config(None, {"data": "data.jsonl", "model": "tiny", "rounds": 1, "clients_per_round": 2, "local_steps": 1,
                                  "batch_size": 2, "max_length": 32, "eval_size": 4, "min_examples": 1, "r_min": 2, "r_max": 4,
                                  "out": str(out)})
    finally:
        os.chdir(cwd)
    run(cfg, progress=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"] == str(data.resolve()) and len(saved["_run"]["data_sha256"]) == 64
    assert resume_config(out).data == str(data.resolve())  # found from any working directory
    data.write_text(data.read_text() + json.dumps({"client_id": "c0", "prompt": "new", "response": "row"}) + "\n")
    with pytest.raises(ValueError, match="is not the one this run started with"):
        resume_config(out, given={"rounds": 2})


def test_dp_without_noise_writes_valid_json(tmp_path):
    out = tmp_path / "dp"
    run(tiny_config(out, rounds=1, local_steps=1, eval_size=4, dp_clip=1.0, dp_noise=0.0), progress=False)
    text = (out / "metrics.jsonl").read_text()
    assert "Infinity" not in text and json.loads(text, parse_constant=lambda c: pytest.fail(c))["dp_epsilon"] is None


def test_revive_keeps_every_component_trainable_in_a_run(tmp_path):
    """Clients of ranks 2 and 3 under r_max 6: hetlora's trainable rank falls to 3 and stays; hetlora-revive's is 6
    after every round, with the same live rank (the revived components have B = 0 until a client trains them)."""
    def ranks(method):
        out = tmp_path / method
        run(tiny_config(out, method=method, rounds=2, clients_per_round=2, rank_dist="list", ranks=[2, 3], max_clients=2,
                        local_steps=1, eval_size=4), progress=False)
        return [(r["trainable_rank"], r["live_rank"]) for r in rows(out)]

    assert ranks("hetlora") == [(3, 3), (3, 3)]
    assert ranks("hetlora-revive") == [(6, 3), (6, 3)]


def test_a_finished_run_is_reused_only_with_the_settings_asked_for(tmp_path):
    """compare and the study skip a finished run; one of other settings must be refused, not reported as this one."""
    from hetlora.server.runner import finished_as_asked

    out = tmp_path / "done"
    out.mkdir()
    cfg = tiny_config(out, rounds=2)
    assert not finished_as_asked(out, cfg)  # nothing there yet
    (out / "summary.json").write_text(json.dumps({"rounds": 2, "config": cfg.settings()}))
    assert finished_as_asked(out, cfg)
    assert not finished_as_asked(out, tiny_config(out, rounds=3))  # same settings, more rounds: continue it
    with pytest.raises(ValueError, match=r"holds a finished run of other settings \(lr: 0.005 → 0.01\)"):
        finished_as_asked(out, tiny_config(out, rounds=2, lr=1e-2))
