"""PEFT glue: attach a LoRA of one rank, load an adapter strictly, read it back.

The scaling is the same at every rank: ``lora_alpha = c · r`` so s = alpha / r = c
(SPEC.md, Notation), which keeps truncation and zero-padding consistent.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from .config import DEFAULT_SCALE, DEFAULT_TARGETS
from .core.adapter import Adapter


class AdapterMismatch(ValueError):
    """A sent adapter did not load exactly: a key was not consumed or a LoRA weight was not set."""


def lora_config(rank: int, scale: float = DEFAULT_SCALE, targets: Sequence[str] = DEFAULT_TARGETS) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=scale * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model, rank: int, scale: float = DEFAULT_SCALE, targets: Sequence[str] = DEFAULT_TARGETS):
    """Wrap ``model`` in a PeftModel with a fresh rank-``rank`` LoRA (PEFT's default init)."""
    return get_peft_model(model, lora_config(rank, scale, targets))


def detach_lora(peft_model):
    """Remove the LoRA layers without merging and return the untouched base model."""
    return peft_model.unload()


def adapter_state(peft_model) -> Adapter:
    """The adapter in PEFT state-dict format, detached fp32 copies on the CPU."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_strict(peft_model, adapter: Mapping[str, torch.Tensor]) -> None:
    """Load ``adapter``; every key must be consumed and every LoRA weight of the model set.

    A silently dropped key makes a run look federated while clients train alone.
    """
    expected = set(get_peft_model_state_dict(peft_model))
    unexpected = sorted(set(adapter) - expected)
    missing = sorted(expected - set(adapter))
    if unexpected or missing:
        raise AdapterMismatch(
            f"adapter does not fit the model: {len(unexpected)} unexpected key(s) {unexpected[:2]}, "
            f"{len(missing)} LoRA key(s) not provided {missing[:2]}"
        )
    result = set_peft_model_state_dict(peft_model, dict(adapter))
    stray = list(getattr(result, "unexpected_keys", []) or [])
    unset = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if stray or unset:
        raise AdapterMismatch(f"PEFT did not consume {stray[:2]} / left LoRA weights unset {unset[:2]}")


def init_global_adapter(model, r_max: int, seed: int, scale: float = DEFAULT_SCALE, targets: Sequence[str] = DEFAULT_TARGETS) -> Adapter:
    """Global A from PEFT's default init at rank r_max with a fixed seed, B = 0 (SPEC.md step 5)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = attach_lora(model, r_max, scale, targets)
    adapter = adapter_state(peft_model)
    detach_lora(peft_model)
    return adapter
