"""The ``--out`` contract: metrics.jsonl, summary.json, plots/, adapter/ (PEFT format), base_delta.safetensors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..files import fsync_file, write_json_atomic


def append_metrics(out: Path, row: Mapping[str, Any]) -> None:
    path = out / "metrics.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(out: Path, torn_tail: bool = False) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; ``torn_tail``: a last line torn by a crash is not a row (any other bad line is an error)."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for n, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if torn_tail and n == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i}: not a JSON object (a torn last line is dropped on --resume)") from None
    return rows


def truncate_metrics(out: Path, last_round: int) -> None:
    """Keep only rows of rounds ≤ ``last_round`` (resume after a crash: no round done twice)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the crash
        if row.get("round", 0) <= last_round:
            keep.append(json.dumps(row, sort_keys=True))
    tmp = path.with_name("metrics.jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    fsync_file(tmp)
    os.replace(tmp, path)


def save_adapter(directory: Path, adapter: Mapping[str, torch.Tensor], rank: int, scale: float, targets: Iterable[str], base: str) -> None:
    """Write a PEFT adapter directory that ``PeftModel.from_pretrained`` loads."""
    from safetensors.torch import save_file

    from ..device.lora import lora_config

    directory.mkdir(parents=True, exist_ok=True)
    config = lora_config(rank, scale, list(targets))
    config.base_model_name_or_path = base
    config.save_pretrained(str(directory))
    save_file({k: v.contiguous().to(torch.float32) for k, v in adapter.items()}, str(directory / "adapter_model.safetensors"))


def save_base_delta(out: Path, delta: Mapping[str, torch.Tensor]) -> None:
    """``OUT/base_delta.safetensors``: what a method folded into the frozen weights (fedex-lora, flora),
    written atomically; absent when there is none. Part of the final model (``hetlora export --merged``)."""
    from safetensors.torch import save_file

    path = out / "base_delta.safetensors"
    if not delta:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().to(torch.float32) for k, v in delta.items()}, str(tmp))
    fsync_file(tmp)
    os.replace(tmp, path)


def write_summary(out: Path, summary: Mapping[str, Any]) -> None:
    write_json_atomic(out / "summary.json", summary)
