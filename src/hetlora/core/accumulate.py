"""One padded accumulation for every rule that sums adapters of mixed rank (docs/algorithm.md §2.3, §8).

HetLoRA's weighted sum Σ_k w_k pad(x_k), the slice average of rbla and hetlora-keep, DP's sum of
clipped changes and FSLoRA's sum of sketched changes are one operation: add each client's factors,
component by component, into an accumulator of rank r_max. :class:`PaddedSum` does it once, for all:

* **one update at a time** (:meth:`PaddedSum.add`): nothing holds a round's updates together, so a
  server can fold each reply in as it arrives;
* **float64 accumulation, fp32 result**: a sum over many clients loses no bits to the order they came
  in; what leaves is fp32, like every aggregate;
* **no padded copies**: a client of rank r_k adds into the first r_k components (or the components
  ``indices`` names: FSLoRA's sketch), since the padding is zeros and adds nothing;
* the **mass** of each component (Σ of the weights that reached it), for the slice average.

Pure tensor code: no I/O, no models.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from .adapter import Adapter, module_of, rank_axis


class PaddedSum:
    """Σ_k w_k pad(x_k) over LoRA adapters at rank ``r_max``, in float64, one update at a time."""

    def __init__(self, r_max: int):
        if r_max < 1:
            raise ValueError(f"r_max must be ≥ 1, got {r_max}")
        self.r_max = r_max
        self.sums: dict[str, Tensor] = {}
        self.layout: dict[str, tuple[int, str]] = {}  # key -> (rank axis, module)
        self.reached: list[tuple[Tensor | int, float | Mapping[str, float]]] = []  # (components, weight) per update
        self.count = 0
        self.spent = False  # total(spend=True) has consumed the accumulators

    def add(self, adapter: Mapping[str, Tensor], weight: float | Mapping[str, float] = 1.0,
            indices: Tensor | Sequence[int] | None = None, a_weight: float | None = None, mass: float | None = None) -> None:
        """Fold one update in: each factor × its weight (one per client, or one per module) into its components
        (the leading ones, or ``indices``: which of the r_max components the update's components are).
        ``a_weight``: the A factors' own weight (one weight for B): a bounded update's scales, not a scaled copy;
        ``mass``: then the client's own weight, which its components' mass counts (a bound's scales are not weights)."""
        self._unspent()
        if a_weight is not None:
            self._add_by_factor(adapter, float(weight), float(a_weight), float(weight if mass is None else mass))
            return
        if mass is not None:
            raise ValueError("mass is a bounded update's own weight: give it with a_weight (one weight is its own mass)")
        keys = list(adapter)
        where = None if indices is None else torch.as_tensor(indices)
        components = self._rank(adapter, keys) if where is None else where  # checked before anything is added
        for key in keys:
            self._place(key, adapter[key])
        with torch.no_grad():
            if where is not None:
                self._scatter(adapter, keys, weight, where)
            elif isinstance(weight, Mapping):
                for key in keys:
                    self._components(key, adapter[key]).add_(adapter[key], alpha=_weight_of(weight, self.layout[key][1]))
            else:  # one weight: every factor in one call (most rounds; the call overhead is per tensor otherwise)
                torch._foreach_add_([self._components(key, adapter[key]) for key in keys], [adapter[key] for key in keys],
                                    alpha=float(weight))
        self.reached.append((components, weight if isinstance(weight, Mapping) else float(weight)))
        self.count += 1

    def _add_by_factor(self, adapter: Mapping[str, Tensor], b_weight: float, a_weight: float, mass: float) -> None:
        keys = list(adapter)
        components = self._rank(adapter, keys)
        for key in keys:
            self._place(key, adapter[key])
        with torch.no_grad():
            for is_a, alpha in ((False, b_weight), (True, a_weight)):
                mine = [key for key in keys if (self.layout[key][0] == 0) == is_a]  # A's rank axis is 0, B's is 1
                torch._foreach_add_([self._components(key, adapter[key]) for key in mine], [adapter[key] for key in mine], alpha=alpha)
        self.reached.append((components, mass))
        self.count += 1

    def add_all(self, adapters: Sequence[Mapping[str, Tensor]], weights: Sequence[float | Mapping[str, float]]) -> None:
        """:meth:`add` for a whole round, in order (the same numbers as adding them one by one)."""
        if len(adapters) != len(weights):
            raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
        for adapter, weight in zip(adapters, weights):
            self.add(adapter, weight)

    def _unspent(self) -> None:
        if self.spent:
            raise ValueError("this sum was spent by total(spend=True): nothing more can be added or read")

    def _rank(self, adapter: Mapping[str, Tensor], keys: list[str]) -> int:
        """How many leading components the update reaches: one rank, at most r_max, for all its factors
        (docs/algorithm.md §1); an update that has none is refused before it touches the sum."""
        ranks = {adapter[key].shape[rank_axis(key)] for key in keys}
        if len(ranks) != 1:
            raise ValueError(f"an update's factors must share one rank, got ranks {sorted(ranks)}")
        rank = ranks.pop()
        if rank > self.r_max:
            raise ValueError(f"an update of rank {rank} does not fit a sum of rank {self.r_max}")
        return rank

    def _components(self, key: str, value: Tensor) -> Tensor:
        """The leading components of ``key``'s accumulator that ``value`` covers (a view)."""
        axis = self.layout[key][0]
        return self.sums[key].narrow(axis, 0, value.shape[axis])

    def _scatter(self, adapter: Mapping[str, Tensor], keys: list[str], weight, where: Tensor) -> None:
        """Factors whose components are the r_max components ``where`` names (FSLoRA's sketch)."""
        for key in keys:
            axis, module = self.layout[key]
            self.sums[key].index_add_(axis, where, adapter[key].to(torch.float64), alpha=_weight_of(weight, module))

    def _place(self, key: str, value: Tensor) -> None:
        """Record ``key``'s (rank axis, module) and make its float64 accumulator on first sight."""
        if key not in self.layout:
            axis = rank_axis(key)
            self.layout[key] = (axis, module_of(key))
            shape = list(value.shape)
            shape[axis] = self.r_max
            self.sums[key] = torch.zeros(shape, dtype=torch.float64)

    def mass(self, module: str) -> Tensor:
        """Σ of the weights that reached each of ``module``'s r_max components."""
        out = torch.zeros(self.r_max, dtype=torch.float64)
        for reached, weight in self.reached:
            w = _weight_of(weight, module)
            if isinstance(reached, int):
                out[:reached] += w
            else:
                out.index_add_(0, reached, torch.full((len(reached),), w, dtype=torch.float64))
        return out

    def total(self, dtype: torch.dtype = torch.float32, scale: float = 1.0, spend: bool = False) -> Adapter:
        """``scale`` × Σ_k w_k pad(x_k), keys sorted (fp32 unless asked otherwise; scaled in float64: a streamed
        round divides by Σ_k w_k here). ``spend``: the sum's last use (a round's end), so each float64 accumulator is
        scaled in place and let go once converted: no float64 copy of the sum, and the server's peak holds the result
        beside what is left of the sum, not the sum twice. The same numbers either way."""
        if not self.count:
            raise ValueError("nothing was added to the sum")
        self._unspent()
        if spend:
            self.spent = True
            return {key: (acc if scale == 1.0 else acc.mul_(scale)).to(dtype)
                    for key in sorted(self.sums) for acc in (self.sums.pop(key),)}
        if scale == 1.0:
            return {key: self.sums[key].to(dtype) for key in sorted(self.sums)}
        return {key: (self.sums[key] * scale).to(dtype) for key in sorted(self.sums)}

    def slice_average(self, previous: Mapping[str, Tensor] | None = None) -> Adapter:
        """Component j = Σ_{k reaching j} w_k x_{k,j} / Σ_{k reaching j} w_k; a component no update reached keeps
        ``previous`` (zero without one). fp32."""
        if not self.count:
            raise ValueError("nothing was added to the sum")
        self._unspent()
        masses = {module: self.mass(module) for module in {m for _, m in self.layout.values()}}
        out: Adapter = {}
        for key in sorted(self.sums):
            axis, module = self.layout[key]
            mass = masses[module]
            covered = mass > 0
            shape = [1, 1]
            shape[axis] = self.r_max
            acc = torch.where(covered.view(shape), self.sums[key] / torch.where(covered, mass, 1.0).view(shape), self.sums[key])
            if previous is not None and key in previous:
                acc = torch.where(covered.view(shape), acc, previous[key].double())
            out[key] = acc.float()
        return out


def _weight_of(weight: float | Mapping[str, float], module: str) -> float:
    """An update's weight for ``module``: its one weight, or its weight for that module (per-layer weights)."""
    return float(weight[module]) if isinstance(weight, Mapping) else float(weight)


class ProductSum:
    """Σ_k w_k B_k A_k per module, one update at a time, in the cheaper exact form (docs/algorithm.md §7.2):
    the stacked factors [B_1 … B_K] and [w_1 A_1; …; w_K A_K] while they hold fewer numbers than the out × in
    matrix, the matrix from then on. What FedEx-LoRA's residual needs, with memory min(K r̄ (out + in), out·in)
    fp32 numbers per module whatever the round's K: the size of the residual the round sends anyway.

    The matrix is fp32, not float64 like :class:`PaddedSum`: it is the size of every adapted weight of the model
    (425 MB for SmolLM2), and in float64 it was the largest thing a server held (1.6 GB at 64 clients, against
    0.8 GB at 4; ``benchmarks/server_scale.py``). Each client's product is added in place (an fp32 ``addmm``, which
    allocates nothing per client): the sum stays within √K fp32 roundings of its largest entry (tested against float64
    at K = 256), the precision of the fp32 base weights it is folded into."""

    def __init__(self) -> None:
        self.stacked: dict[str, tuple[list[Tensor], list[Tensor]]] = {}  # module -> ([B_k], [w_k A_k]) in fp32
        self.dense: dict[str, Tensor] = {}  # module -> Σ w_k B_k A_k in fp32

    def add(self, adapter: Mapping[str, Tensor], b_weight: float = 1.0, a_weight: float = 1.0) -> None:
        """Fold in one update's B_k A_k × b_weight · a_weight (a bounded update's scales: B × β, A × w·α)."""
        from .adapter import lora_pairs

        with torch.no_grad():
            for module, b, a in lora_pairs(adapter):
                if module in self.dense:  # in place: no out × in temporary per client
                    self.dense[module].addmm_(b.float(), a.float(), alpha=b_weight * a_weight)
                    continue
                bs, as_ = self.stacked.setdefault(module, ([], []))
                bs.append(b.float() * b_weight)
                as_.append(a.float() * a_weight)
                rank, (out_f, in_f) = sum(x.shape[1] for x in bs), (b.shape[0], a.shape[1])
                if rank * (out_f + in_f) >= out_f * in_f:  # the matrix is smaller from here on
                    self.dense[module] = _summed_products(*self.stacked.pop(module), out_f, in_f)

    def residual_factors(self, module: str, b_bar: Tensor, a_bar: Tensor, total: float) -> tuple[Tensor, Tensor]:
        """[B_1 … B_K, B̄], [w_1 A_1; …; w_K A_K; −Ā] with the w_k divided by ``total``, taking the module's stacked
        factors out of the sum (one copy of them at a time, not three)."""
        bs, as_ = self.stacked.pop(module)
        b = torch.cat(bs + [b_bar.float()], dim=1)
        bs.clear()
        a = torch.cat(as_ + [-a_bar.float()], dim=0)
        as_.clear()
        a[: a.shape[0] - a_bar.shape[0]].div_(total)
        return b, a

    def factors(self, module: str) -> tuple[Tensor, Tensor] | None:
        """[B_1 … B_K], [w_1 A_1; …; w_K A_K] of a module still stacked (None once it is dense)."""
        if module not in self.stacked:
            return None
        bs, as_ = self.stacked[module]
        return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def _summed_products(bs: list[Tensor], as_: list[Tensor], out_features: int, in_features: int) -> Tensor:
    """Σ_k B_k A_k as one fp32 matrix, each pair let go once added: no concatenated copy of the stacked factors
    beside them (that copy was the peak of a 16-client fedex-lora round)."""
    dense = torch.zeros(out_features, in_features)
    while bs:
        dense.addmm_(bs.pop(), as_.pop())
    return dense
