"""Checkpoints: exact round trip, the newest that verifies wins, atomic writers leave old or new, never neither."""

import hashlib
import json
import re

import pytest
import torch

from hetlora.server.checkpoint import MANIFEST, CorruptCheckpoint, load_latest, save_checkpoint, verify
from hetlora.files import write_directory_atomic, write_json_atomic


def tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"global": {"m.lora_A.weight": torch.randn(3, 5, generator=g), "m.lora_B.weight": torch.randn(4, 3, generator=g).double()}}


def test_round_trip_is_exact_and_the_manifest_holds_each_files_sha256(tmp_path):
    path = save_checkpoint(tmp_path, 3, tensors(0), {"round": 3, "ranks": {"a": 5}})
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["round"] == 3 and sorted(manifest["files"]) == ["global.safetensors", "state.json"]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest
    round_index, loaded, state = load_latest(tmp_path)
    assert round_index == 3 and state == {"round": 3, "ranks": {"a": 5}}
    for k, v in tensors(0)["global"].items():
        assert loaded["global"][k].dtype == v.dtype and torch.equal(loaded["global"][k], v)


def test_only_the_last_rounds_are_kept(tmp_path):
    for r in range(1, 5):
        save_checkpoint(tmp_path, r, tensors(r), {"round": r}, keep=2)
    assert [p.name for p in sorted(tmp_path.glob("round-*"))] == ["round-00003", "round-00004"]


@pytest.mark.parametrize("damage", ["flipped byte", "no manifest", "missing file", "unparseable manifest"])
def test_a_damaged_newest_round_falls_back_to_the_one_before(tmp_path, damage):
    save_checkpoint(tmp_path, 1, tensors(1), {"round": 1})
    newest = save_checkpoint(tmp_path, 2, tensors(2), {"round": 2})
    if damage == "flipped byte":
        data = bytearray((newest / "global.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (newest / "global.safetensors").write_bytes(bytes(data))
    elif damage == "no manifest":
        (newest / MANIFEST).unlink()
    elif damage == "missing file":
        (newest / "state.json").unlink()
    else:
        (newest / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptCheckpoint, match=re.escape(str(newest))):
        verify(newest)
    round_index, loaded, _ = load_latest(tmp_path)
    assert round_index == 1 and torch.equal(loaded["global"]["m.lora_A.weight"], tensors(1)["global"]["m.lora_A.weight"])
    (tmp_path / "round-00001" / MANIFEST).unlink()
    assert load_latest(tmp_path) is None


def test_required_and_allowed_files(tmp_path):
    path = save_checkpoint(tmp_path, 1, tensors(0) | {"base_delta": {"x": torch.ones(2)}}, {})
    with pytest.raises(CorruptCheckpoint, match="unexpected file"):
        verify(path)  # base_delta not allowed for this method
    assert verify(path, allowed=("global", "base_delta"))["round"] == 1
    with pytest.raises(CorruptCheckpoint, match=r"does not list \['clients.safetensors'\]"):
        verify(path, required=("global", "clients"), allowed=("global", "base_delta", "clients"))


def test_write_json_atomic_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"b": 1, "a": [1.5, None]})
    write_json_atomic(path, {"c": 2})
    assert json.loads(path.read_text()) == {"c": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_write_directory_atomic_keeps_the_old_directory_when_writing_fails(tmp_path):
    target = tmp_path / "export"
    write_directory_atomic(target, lambda d: (d / "a.txt").write_text("old"))

    def fail_halfway(d):
        (d / "a.txt").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_directory_atomic(target, fail_halfway)
    assert (target / "a.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["export"]
    write_directory_atomic(target, lambda d: (d / "b.txt").write_text("new"))
    assert [p.name for p in target.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["export"]


def test_rounds_are_ordered_by_number_past_99999(tmp_path):
    """round-100000 sorts before round-99999 as text: the newest checkpoint was deleted right after it was written."""
    for r in (99_998, 99_999, 100_000, 100_001):
        save_checkpoint(tmp_path, r, tensors(r % 7), {"round": r}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("round-*")) == ["round-100000", "round-100001"]
    assert load_latest(tmp_path)[0] == 100_001


def test_a_checkpoint_of_another_run_is_skipped_and_never_pruned(tmp_path, caplog):
    for r in (1, 2):
        save_checkpoint(tmp_path, r, tensors(r), {"round": r}, run_id="mine")
    save_checkpoint(tmp_path, 9, tensors(9), {"round": 9}, run_id="theirs", keep=5)  # planted, newer
    with caplog.at_level("WARNING"):
        assert load_latest(tmp_path, run_id="mine")[0] == 2
    assert "belongs to another run" in caplog.text
    save_checkpoint(tmp_path, 3, tensors(3), {"round": 3}, run_id="mine", keep=2)
    assert sorted(p.name for p in tmp_path.glob("round-*")) == ["round-00002", "round-00003", "round-00009"]
    assert load_latest(tmp_path, run_id="mine")[0] == 3


def test_a_foreign_directory_named_like_a_future_round_is_moved_aside_never_deleted(tmp_path):
    """Issue 40: a planted or foreign ``round-00003`` was deleted when the run wrote its round 3. Now it is moved
    aside (``round-00003.foreign-1``) with its files intact; this run's own rewrite of a round still replaces it."""
    root = tmp_path / "checkpoint"
    planted = root / "round-00003"
    planted.mkdir(parents=True)
    (planted / "notes.txt").write_text("not the run's")
    tensors = {"global": {"w": torch.ones(2)}}
    save_checkpoint(root, 3, tensors, {"round": 3}, run_id="mine")
    assert (root / "round-00003.foreign-1" / "notes.txt").read_text() == "not the run's"
    verify(root / "round-00003")  # the run's own, whole
    save_checkpoint(root, 3, {"global": {"w": torch.zeros(2)}}, {"round": 3}, run_id="mine")  # the run's own: replaced
    assert not (root / "round-00003.foreign-2").exists()
    round_index, loaded, state = load_latest(root)
    assert round_index == 3 and torch.equal(loaded["global"]["w"], torch.zeros(2))
