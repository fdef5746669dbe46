"""``hetlora export``: a finished run's model, ready for on-device inference.

``--merged DIR``: the run's final model as a standalone HF model — the base weights plus, for
methods that fold updates into the frozen weights (fedex-lora, flora), the cumulative base
delta (``OUT/base_delta.safetensors``), plus the global adapter merged in. That is exactly the
model the run evaluated last. The target is written through a temporary sibling and renamed
into place; a non-empty target is refused unless ``force``, and no target may be the run
directory, contain it, or lie inside it (symlinks resolved), ``force`` or not.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..files import write_directory_atomic
from ..core.base_delta import delta_modules, dense_delta

BASE_DELTA_FILE = "base_delta.safetensors"


def finished_run(run_dir: Path) -> dict:
    """The settings of a finished run with a model to export (one line naming the problem if not)."""
    from ..clients import get_kind
    from ..methods import get_method
    from ..server.runner import run_settings

    config = run_settings(run_dir, "export")
    method = get_method(str(config.get("method")))
    if not get_kind(method.client_kind).has_adapter and not method.folds_into_base:
        raise ValueError(f"{run_dir}: method {method.name} ends with no LoRA adapter (its update lives in the model weights); "
                         "there is nothing to export")
    done = (run_dir / "adapter" / "adapter_model.safetensors").is_file() or (run_dir / BASE_DELTA_FILE).is_file()
    if not done:
        raise ValueError(f"{run_dir} has no adapter/ yet: the run has not finished (continue it with --resume)")
    return config


def base_delta(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's cumulative base delta (empty for methods that fold nothing into the base)."""
    from safetensors.torch import load_file

    path = run_dir / BASE_DELTA_FILE
    return load_file(str(path)) if path.is_file() else {}


def fold_base_delta(model, delta: dict[str, torch.Tensor], scale: float) -> None:
    """W ← W + s·ΔW on every module the base delta touches (as the host applies it while training)."""
    from ..device.lora import PEFT_PREFIX

    modules = dict(model.named_modules())
    with torch.no_grad():
        for module in delta_modules(delta):
            weight = modules[module.removeprefix(PEFT_PREFIX)].weight
            weight.copy_(weight.float() + scale * dense_delta(delta, module).to(weight.device))


def prepare_target(run_dir: Path, target: Path, force: bool) -> None:
    run, tgt = run_dir.resolve(), target.resolve()
    if tgt == run or run.is_relative_to(tgt) or tgt.is_relative_to(run):
        raise ValueError(f"refusing to write into {target}: it is, contains or lies inside the run directory {run_dir}")
    if tgt.exists() and not tgt.is_dir():
        raise ValueError(f"{target} is a file, not a directory")
    if tgt.is_dir() and any(tgt.iterdir()) and not force:
        raise ValueError(f"{target} is not empty; choose an empty directory or pass --force to replace it")


def export_merged(run_dir: Path, target: Path, force: bool = False) -> Path:
    from peft import PeftModel

    from ..config import DEFAULT_SCALE
    from ..models.loading import load_base_model

    config = finished_run(run_dir)
    prepare_target(run_dir, target, force)
    model, tokenizer = load_base_model(config["model"])
    fold_base_delta(model, base_delta(run_dir), float(config.get("lora_scale", DEFAULT_SCALE)))
    if (run_dir / "adapter" / "adapter_model.safetensors").is_file():
        model = PeftModel.from_pretrained(model, str(run_dir / "adapter")).merge_and_unload()

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    write_directory_atomic(target, write)
    return target
