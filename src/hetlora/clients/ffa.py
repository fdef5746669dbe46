"""FFA-LoRA's client: A frozen (shared from the seed), only B trained and sent."""

from __future__ import annotations

from ..core.adapter import B_SUFFIX, ClientUpdate
from ..core.validation import LayerShapes
from .job import State
from .lora import LoRAClient


class FFAClient(LoRAClient):
    name = "ffa"
    freeze_a = True

    def upload_bytes(self, update: ClientUpdate) -> int:
        """Only B travels up: A is the shared frozen one."""
        return sum(v.numel() * v.element_size() for k, v in update.adapter.items() if k.endswith(B_SUFFIX))

    def trainable_params(self, shapes: LayerShapes, rank: int, state: State) -> int:
        """out·r per adapted module (B only)."""
        return sum(o * rank for o, _ in shapes.values())
