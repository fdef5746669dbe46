"""The record every result carries: the commit the code was imported from (dirty when tracked files differ)."""

import shutil
import subprocess
from pathlib import Path

import hetlora
from hetlora.provenance import environment, git_commit


def test_commit_is_the_source_trees_head_with_dirty_for_local_changes():
    root = Path(hetlora.__file__).resolve().parents[2]
    if shutil.which("git") is None:
        assert git_commit() == "unknown"
        return
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not head:  # installed from a wheel or an archive: no git tree to name
        assert git_commit() == "unknown"
        return
    changed = subprocess.run(["git", "-C", str(root), "diff", "HEAD", "--quiet"]).returncode != 0
    assert git_commit() == head + ("-dirty" if changed else "")


def test_environment_names_commit_device_and_versions():
    import torch

    env = environment("cpu")
    assert env["device"].startswith("cpu: ") and env["torch"] == torch.__version__
    assert {"commit", "transformers", "peft", "python"} <= env.keys()
