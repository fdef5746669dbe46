"""``hetlora export``: a finished run's global adapter, ready for on-device inference.

``--merged DIR``: the adapter folded into its base model, saved as a standalone HF model.
The target is written through a temporary sibling and renamed into place; a non-empty
target is refused unless ``force``, and the run directory itself (or a directory that
contains it) never is a target.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import write_directory_atomic


def finished_run(run_dir: Path) -> dict:
    """The settings of a finished run that has a global adapter (one line naming the problem if not)."""
    from .clients import get_kind
    from .methods import get_method

    from .runner import run_settings

    config = run_settings(run_dir, "export")
    method = str(config.get("method"))
    if not get_kind(get_method(method).client_kind).has_adapter:
        raise ValueError(f"{run_dir}: method {method} ends with no LoRA adapter (its update lives in the model weights); "
                         "there is nothing to export")
    if not (run_dir / "adapter" / "adapter_model.safetensors").is_file():
        raise ValueError(f"{run_dir} has no adapter/ yet: the run has not finished (continue it with --resume)")
    return config


def prepare_target(run_dir: Path, target: Path, force: bool) -> None:
    run, tgt = run_dir.resolve(), target.resolve()
    if tgt == run or run.is_relative_to(tgt):
        raise ValueError(f"refusing to write into {target}: it is (or contains) the run directory {run_dir}")
    if tgt.exists() and not tgt.is_dir():
        raise ValueError(f"{target} is a file, not a directory")
    if tgt.is_dir() and any(tgt.iterdir()) and not force:
        raise ValueError(f"{target} is not empty; choose an empty directory or pass --force to replace it")


def export_merged(run_dir: Path, target: Path, force: bool = False) -> Path:
    from peft import PeftModel

    from .models import load_base_model

    config = finished_run(run_dir)
    prepare_target(run_dir, target, force)
    base, tokenizer = load_base_model(config["model"])
    merged = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload()

    def write(tmp: Path) -> None:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    write_directory_atomic(target, write)
    return target
