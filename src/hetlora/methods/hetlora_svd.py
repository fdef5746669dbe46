"""``hetlora-svd`` and ``hetlora-revive``: HetLoRA's aggregation, then the global adapter's rank health restored
(docs/algorithm.md §3).

HetLoRA's zero-padded factor average (hetlora.methods.hetlora) leaves components in no order of
importance, so a low tier's truncation serves it by luck, and it zeroes every component above the
largest rank of a round for good. Two repairs, each exact on the global model:

* ``hetlora-svd`` re-factors each module's B̄Ā by SVD from QR of the factors (no out × in matrix):
  the product is unchanged and every truncation is the best rank-r approximation of the global ΔW
  (FedSVD's re-basing, seanie12/fed-svd; NVFlare's HLoRA aggregator gets the SVD from QR the same way).
* ``hetlora-revive`` gives every component with a zero A row and B column a fresh A row drawn as
  LoRA initialises A (seeded by seed, round, module), B column zero: ΔW is unchanged and the
  component trains again.
* ``hetlora-svd-revive``: both, in that order (the SVD's zero components are the ones revived).
"""

from __future__ import annotations

import torch

from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter, module_names
from ..core.rank_health import refactor_by_svd, revive
from ..core.seeds import derive_seed
from .base import AggregationContext
from .hetlora import HetLoRA


class HetLoRASVD(HetLoRA):
    name = "hetlora-svd"
    svd = True
    revive = False

    def finish(self, aggregated: Adapter, ctx: AggregationContext) -> Adapter:
        """The rank-health repair on HetLoRA's aggregate (it needs only the aggregate: a secure sum gets it too)."""
        out = dict(aggregated)
        for module in module_names(out):
            b, a = out[module + B_SUFFIX], out[module + A_SUFFIX]
            if self.svd:
                b, a = refactor_by_svd(b, a)
            if self.revive:
                generator = torch.Generator().manual_seed(derive_seed("revive", ctx.seed, ctx.round_index, module))
                b, a, _ = revive(b, a, generator)
            out[module + B_SUFFIX], out[module + A_SUFFIX] = b, a
        return out


class HetLoRARevive(HetLoRASVD):
    name = "hetlora-revive"
    svd = False
    revive = True


class HetLoRASVDRevive(HetLoRASVD):
    name = "hetlora-svd-revive"
    svd = True
    revive = True
