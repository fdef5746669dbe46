"""What both Flower apps share: the run config and adapter <-> ArrayRecord conversion."""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord

from ..config import RunConfig, from_mapping

CONFIG_KEY = "hetlora-config"


def to_array_record(adapter: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in adapter.items()})


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Tensors from Flower arrays (numpy bytes, never pickle)."""
    return dict(record.to_torch_state_dict())


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """A RunConfig from ``[tool.flwr.app.config]`` (flat keys; lists and None as JSON strings).

    ``hetlora run --engine flower`` passes the whole config as one JSON string under
    ``hetlora-config``; ``flwr run .`` gives the individual keys.
    """
    if CONFIG_KEY in run_config:
        return from_mapping(json.loads(str(run_config[CONFIG_KEY])), none_is_value=True)  # the whole config: None is a value
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        if key == "resume":
            continue
        if isinstance(value, str) and value.startswith(("[", "{")):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"run config {key} = {value!r} is not valid JSON: {err.msg}") from None
        values[key] = value  # "off" becomes None only where a setting allows it (hetlora.config)
    return from_mapping(values)


def encode_config(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)
