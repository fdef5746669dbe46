"""A client kind: everything that differs between the ways a client can train.

The server keeps a *global state*: named groups of tensors, ``{"global": adapter}`` plus
what a kind needs (``"base_delta"``: updates folded into the frozen weights). It sends
each sampled client a :class:`~hetlora.clients.job.Job`. A kind owns, in one class: the
payload a client receives, local training, evaluation of the global model, byte accounting,
the trainable-parameter count, and what the server's state becomes after an aggregate.
``Federation`` (hetlora.server.federation) orchestrates and never asks which kind it runs.

:class:`ClientKind` is the interface (and the accounting every kind shares); the LoRA kinds
extend :class:`hetlora.clients.lora.LoRAClient`, full fine-tuning extends this directly.
Adding a kind: a subclass in one module here, a line in ``hetlora.clients.CLIENT_KINDS``,
and its name as ``client_kind`` of a method (docs/algorithm.md §8).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from torch import Tensor

from ..core.adapter import Adapter, ClientUpdate, num_bytes
from ..core.base_delta import fold
from ..core.validation import LayerShapes
from .job import Job, State

if TYPE_CHECKING:
    from ..device.host import ClientHost

#: what an evaluation measures of the global model once a kind has set it up on the host: (host, examples) -> value
Measure = Callable[["ClientHost", Any], Any]


def held_out_loss(host: "ClientHost", examples=None) -> float:
    """The default measure: the mean target-token loss (the run's evaluation set when ``examples`` is None)."""
    return host.evaluate_loss(examples=examples)


class ClientKind:
    """The interface of a client kind; subclasses set the attributes and implement the abstract methods."""

    name = ""
    #: the global model can be truncated to each client rank tier and evaluated there
    rank_tiers = True
    #: train only B (A frozen)
    freeze_a = False
    #: the run ends with a global LoRA adapter to save (``OUT/adapter``) and export
    has_adapter = True
    #: how many clients may train together in one process (one shared frozen model)
    parallel = True

    # ------------------------------------------------------------------ server side
    def initial_state(self, host: "ClientHost", rank: int, seed: int) -> State:
        """The server's global state before the first round."""
        raise NotImplementedError

    def payload(self, state: State, client_id: str, rank: int, round_index: int, seed: int) -> dict[str, Tensor]:
        """What client ``client_id`` receives this round."""
        raise NotImplementedError

    def trainable_params(self, shapes: LayerShapes, rank: int, state: State) -> int:
        """How many numbers a client at ``rank`` trains."""
        raise NotImplementedError

    def evaluate(self, state: State, host: "ClientHost", ranks: Sequence[int], base_version: int, examples=None,
                 measure: Measure | None = None) -> dict[int, Any]:
        """Held-out loss of the global model (at each rank, for kinds with rank tiers); ``measure(host, examples)``
        measures something else of the model so set up (:func:`held_out_loss` by default; greedy responses for ROUGE-L)."""
        raise NotImplementedError

    def download_bytes(self, job: Job) -> int:
        return num_bytes(job.payload) + num_bytes(job.base)

    def upload_bytes(self, update: ClientUpdate) -> int:
        return num_bytes(update.adapter)

    def after_aggregate(self, state: State, aggregated: Adapter, base_update: Adapter | None) -> State:
        """The server's state after a round: the aggregate becomes the global adapter; a
        method's base update is folded into the cumulative base delta."""
        new = {**state, "global": aggregated}
        if base_update:
            new["base_delta"] = fold(state.get("base_delta"), base_update)
        return new

    # ------------------------------------------------------------------ client side
    def train(self, host: "ClientHost", jobs: Sequence[Job], *, prune: bool) -> list[ClientUpdate]:
        """Train ``jobs`` (together where the kind is ``parallel``) and return their updates."""
        raise NotImplementedError
