"""The client host: what a device holds — the base model, its data and the local settings.

The in-process engine keeps one host for every simulated client and for the server's
held-out evaluation; a Flower ClientApp builds one per process and trains only the
client its node holds. Neither needs the server's state (hetlora.federation).
"""

from __future__ import annotations

import torch

from .config import RunConfig
from .evaluate import evaluate_loss
from .training import LocalConfig


def pick_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


class ClientHost:
    def __init__(self, cfg: RunConfig, model=None, tokenizer=None, data=None):
        from .data import load_data
        from .models import load_base_model

        self.cfg = cfg
        if model is None:
            model, tokenizer = load_base_model(cfg.model)
        self.model, self.tokenizer = model.to(pick_device(cfg.device)), tokenizer
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.data = data if data is not None else load_data(cfg.data, tokenizer, **cfg.data_options())
        ids = self.data.client_ids
        self.client_ids: list[str] = ids[: cfg.max_clients] if cfg.max_clients else ids
        self.local = LocalConfig.from_run(cfg)
        self.seed = cfg.seed

    def evaluate_loss(self, model) -> float:
        """Mean target-token loss of ``model`` on the held-out examples."""
        return evaluate_loss(model, self.data.eval_examples(), self.tokenizer.pad_token_id, self.cfg.eval_batch_size, self.cfg.bf16)
