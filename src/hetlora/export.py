"""``hetlora export``: fold a run's global adapter into its base model for on-device inference."""

from __future__ import annotations

import json
from pathlib import Path


def export_merged(run_dir: Path, target: Path) -> Path:
    from peft import PeftModel

    from .models import load_base_model

    config_path = run_dir / "config.json"
    adapter_dir = run_dir / "adapter"
    if not config_path.is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ValueError(f"{run_dir} has no config.json and adapter/ (is it a finished LoRA run?)")
    model_name = json.loads(config_path.read_text())["model"]
    base, tokenizer = load_base_model(model_name)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    target.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    return target
