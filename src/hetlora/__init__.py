"""hetlora: federated fine-tuning of on-device language models with heterogeneous-rank LoRA.

HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432) and the methods it is compared
with, on one pure-tensor core (``hetlora.core``) run by an in-process engine and by Flower.
"""

from .core.adapter import (
    ClientUpdate,
    adapter_rank,
    product_norm_sq,
    truncate_adapter,
    update_norm,
    zero_pad_adapter,
)
from .core.pruning import prune_rank, tail_penalty, tail_start
from .core.ranks import DEVICE_TIERS, assign_ranks, list_ranks, tier_ranks, uniform_ranks
from .core.validation import InvalidUpdate, split_valid, validate_update, validate_updates
from .methods import METHODS, aggregate, get_method
from .methods.hetlora import sparsity_weights

__version__ = "0.1.0"


def load_base_model(name: str = "smollm2", **kwargs):
    """Load a base model and its tokenizer (see :func:`hetlora.models.loading.load_base_model`)."""
    from .models.loading import load_base_model as _load

    return _load(name, **kwargs)


__all__ = [
    "ClientUpdate",
    "DEVICE_TIERS",
    "InvalidUpdate",
    "METHODS",
    "adapter_rank",
    "aggregate",
    "assign_ranks",
    "get_method",
    "list_ranks",
    "load_base_model",
    "product_norm_sq",
    "prune_rank",
    "sparsity_weights",
    "split_valid",
    "tail_penalty",
    "tail_start",
    "tier_ranks",
    "truncate_adapter",
    "uniform_ranks",
    "update_norm",
    "validate_update",
    "validate_updates",
    "zero_pad_adapter",
]
