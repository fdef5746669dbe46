"""Client kinds: how a client trains and what travels for it (see :mod:`hetlora.clients.base`).

Adding a kind = one module with a :class:`ClientKind` subclass (a LoRA variant extends
:class:`LoRAClient`) + one line in ``CLIENT_KINDS``.
"""

from __future__ import annotations

from .base import ClientKind
from .ffa import FFAClient
from .fft import FFTClient
from .flora import FLoRAClient
from .fslora import FSLoRAClient
from .job import Job, State
from .lora import LoRAClient
from .plora import PLoRAClient

CLIENT_KINDS: dict[str, ClientKind] = {k.name: k for k in (LoRAClient(), FFAClient(), FLoRAClient(), FSLoRAClient(), FFTClient(), PLoRAClient())}


def get_kind(name: str) -> ClientKind:
    try:
        return CLIENT_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown client kind {name!r}; known: {', '.join(CLIENT_KINDS)}") from None


__all__ = ["CLIENT_KINDS", "ClientKind", "Job", "LoRAClient", "State", "get_kind"]
