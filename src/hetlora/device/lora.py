"""LoRA on a frozen model for K clients at once: one wrap per run, rank-masked slots.

A :class:`LoRABank` holds, for every target linear layer W0 (out × in), factors
A [K, R, in] and B [K, out, R] and adds them with forward hooks: a batch holds K equal
groups of rows and group k gets y = W0 x + s · B_k A_k x. The model's own modules,
names and weights are untouched, so a bank attaches once per run and every client,
every rank and every evaluation reuses it (docs/algorithm.md, "Throughput").

A client of rank r_k ≤ R uses components :r_k of its slot; the rest are zero in both
A and B, so their gradient is exactly zero and they stay zero: one bank at R = r_max
serves every rank, and training K clients together is K independent LoRAs.

Adapters travel in PEFT's state-dict format (``<prefix><module>.lora_A.weight`` A [r, in],
``...lora_B.weight`` B [out, r]); the scaling is the same at every rank, ``lora_alpha = c·r``
so s = c, which keeps truncation and zero-padding consistent (docs/algorithm.md, "Scaling").
PEFT itself is used to save adapter configs and to load our adapters in ``PeftModel``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..config import DEFAULT_SCALE, DEFAULT_TARGETS
from ..core.adapter import A_SUFFIX, B_SUFFIX, Adapter
from ..models.quantised import QuantisedLinear

#: the frozen layers LoRA wraps: dense, or in a GGUF's own blocks (docs/algorithm.md §7.1)
LINEAR_LAYERS = (nn.Linear, QuantisedLinear)

PEFT_PREFIX = "base_model.model."


class AdapterMismatch(ValueError):
    """A sent adapter does not fit the model: a key was not consumed or a LoRA weight was not set."""


def lora_config(rank: int, scale: float = DEFAULT_SCALE, targets: Sequence[str] = DEFAULT_TARGETS):
    """PEFT's LoraConfig for our convention (lora_alpha = scale · rank, no dropout, no bias)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=list(targets), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def find_targets(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Module]:
    """module path -> linear layer for every module whose last name is in ``targets``.

    A name that matches no module, or only modules that are not ``nn.Linear``, is an error:
    a silently ignored name makes a run train less than it says.
    """
    found: dict[str, nn.Module] = {}
    matched: dict[str, list[str]] = {t: [] for t in targets}
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if leaf in matched:
            matched[leaf].append(type(module).__name__)
            if isinstance(module, LINEAR_LAYERS):
                found[path] = module
    missing = [t for t, kinds in matched.items() if not kinds]
    if missing:
        raise ValueError(f"target module(s) {missing} not found in the model; its linear layers are named "
                         f"{sorted({p.rsplit('.', 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})}")
    not_linear = [t for t, kinds in matched.items() if kinds and not any(k == "Linear" or k.endswith("Linear") for k in kinds)]
    if not_linear or not found:
        raise ValueError(f"target module(s) {not_linear or list(targets)} are not nn.Linear layers; LoRA here wraps linear layers only")
    return found


def target_shapes(model: nn.Module, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """PEFT module key -> (out, in) of every target layer."""
    return {PEFT_PREFIX + p: (m.out_features, m.in_features) for p, m in find_targets(model, targets).items()}


def lora_init(shapes: Mapping[str, tuple[int, int]], rank: int, seed: int) -> Adapter:
    """PEFT's default LoRA initialisation at ``rank``: A ~ kaiming-uniform(a=√5) = U(±1/√in), B = 0.

    Drawn from a generator of its own (sorted module order), so it depends only on
    ``seed``, not on the global RNG, the device, or the order a library visits modules.
    """
    g = torch.Generator().manual_seed(seed)
    out: Adapter = {}
    for module in sorted(shapes):
        o, i = shapes[module]
        bound = 1.0 / math.sqrt(i)  # gain √(2/(1+5)) · √(3/in)
        out[module + A_SUFFIX] = (torch.rand(rank, i, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).float()
        out[module + B_SUFFIX] = torch.zeros(o, rank)
    return out


class LoRABank(nn.Module):
    def __init__(self, model: nn.Module, targets: Sequence[str], slots: int, rank: int, scale: float = DEFAULT_SCALE):
        super().__init__()
        layers = find_targets(model, targets)
        self.device = next(model.parameters()).device
        self.paths = list(layers)
        self.keys = [PEFT_PREFIX + p for p in self.paths]
        self.dims = [(m.out_features, m.in_features) for m in layers.values()]
        self.scale = scale
        self.resize(slots, rank)
        self.alpha = float(scale)  # the scaling of the current batch when all its slots share one (fp32)
        self.per_slot_scale: torch.Tensor | None = None  # s·factor per slot when the slots' factors differ
        self.prefix_mask: torch.Tensor | None = None  # [slots, R] 1 on each slot's trained prefix (ordered dropout)
        self.active = 0  # slots in use by the current batch (0: the bank adds nothing)
        self.used_rank = rank  # components the current batch needs (the largest active rank)
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers.values())]

    def resize(self, slots: int, rank: int) -> None:
        """Hold exactly ``slots`` slots of ``rank`` components (zeros), freeing the old factors.

        A client trains a bank of its own size: a rank-5 client in an r_max = 50 bank held
        gradients and AdamW moments for ten times what it trains (docs/algorithm.md §7).
        """
        self.slots, self.rank = slots, rank
        self.A = nn.ParameterList(nn.Parameter(torch.zeros(slots, rank, i, device=self.device), requires_grad=False) for _, i in self.dims)
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(slots, o, rank, device=self.device), requires_grad=False) for o, _ in self.dims)

    # ------------------------------------------------------------------ forward
    def _hook(self, index: int):
        def add_lora(module, args, output):
            if not self.active:
                return None
            x = args[0]
            k, r = self.active, self.used_rank
            a, b = self.A[index][:k, :r], self.B[index][:k, :, :r]
            xs = x.reshape(k, -1, x.shape[-1])
            h = torch.bmm(xs, a.transpose(1, 2).to(xs.dtype))  # [k, n, r]: small
            if self.per_slot_scale is not None:  # slots with different factors: applied to h in fp32
                h = (h.float() * self.per_slot_scale[:k].view(k, 1, 1)).to(xs.dtype)
            if self.prefix_mask is not None:  # components past a slot's prefix add nothing and get no gradient
                h = h * self.prefix_mask[:k, None, :r].to(h.dtype)
            out3 = output.reshape(k, -1, output.shape[-1])
            # y += α·h Bᵀ in one kernel, in place: α is a Python float, so the scaling stays fp32
            # under bf16 autocast (a bf16 scale tensor rounds FSLoRA's s·50/7 up by 0.19 %), and no
            # output-sized tensor is made for the product, the scaling or the sum (the base output
            # is not saved for backward, so autograd allows writing into it).
            if out3.dtype != h.dtype:
                return torch.baddbmm(out3, h, b.transpose(1, 2).to(h.dtype), alpha=self.alpha).reshape(output.shape).to(output.dtype)
            out3.baddbmm_(h, b.transpose(1, 2).to(h.dtype), alpha=self.alpha)
            return output

        return add_lora

    def remove(self) -> None:
        """Take the hooks off: the model is exactly the base model again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def use(self, slots: int, rank: int | None = None, scales: Sequence[float] | None = None) -> Iterator["LoRABank"]:
        """Apply the first ``slots`` slots (components :rank) inside the block, nothing outside it.

        ``scales``: a factor per slot on top of s (FSLoRA's r/m), 1 by default.
        """
        if not 1 <= slots <= self.slots:
            raise ValueError(f"the bank has {self.slots} slot(s), asked for {slots}")
        self.active, self.used_rank = slots, min(rank or self.rank, self.rank)
        factors = [float(f) for f in scales] if scales is not None else [1.0]
        if len(set(factors)) == 1:
            self.alpha = self.scale * factors[0]
        else:
            self.alpha = 1.0
            self.per_slot_scale = torch.tensor([self.scale * f for f in factors], dtype=torch.float32, device=self.A[0].device)
        try:
            yield self
        finally:
            self.active, self.used_rank = 0, self.rank
            self.alpha, self.per_slot_scale, self.prefix_mask = float(self.scale), None, None

    def use_prefixes(self, prefixes: Sequence[int]) -> None:
        """Inside :meth:`use`: slot k uses only its components :prefixes[k] (ordered dropout) until the block ends."""
        mask = torch.zeros(self.slots, self.rank, device=self.A[0].device)
        for slot, p in enumerate(prefixes):
            mask[slot, :p] = 1.0
        self.prefix_mask = mask

    # ------------------------------------------------------------------ adapters in and out
    def load(self, slot: int, adapter: Mapping[str, Tensor]) -> int:
        """Put a PEFT-format adapter into ``slot``, zero above its rank; returns the rank.

        Every key must be consumed and every module set: a silently dropped key makes a
        run look federated while clients train alone.
        """
        expected = {k + s for k in self.keys for s in (A_SUFFIX, B_SUFFIX)}
        unexpected, missing = sorted(set(adapter) - expected), sorted(expected - set(adapter))
        if unexpected or missing:
            raise AdapterMismatch(
                f"adapter does not fit the model: {len(unexpected)} unexpected key(s) {unexpected[:2]}, "
                f"{len(missing)} LoRA key(s) not provided {missing[:2]}"
            )
        ranks = {adapter[k + A_SUFFIX].shape[0] for k in self.keys}
        if len(ranks) != 1 or not 1 <= (r := ranks.pop()) <= self.rank:
            raise AdapterMismatch(f"adapter ranks {sorted(ranks)} do not fit a bank of rank {self.rank}")
        with torch.no_grad():
            for i, key in enumerate(self.keys):
                a, b = adapter[key + A_SUFFIX], adapter[key + B_SUFFIX]
                if a.shape != (r, self.A[i].shape[2]) or b.shape != (self.B[i].shape[1], r):
                    raise AdapterMismatch(f"{key}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the layer")
                self.A[i][slot].zero_()
                self.B[i][slot].zero_()
                self.A[i][slot, :r].copy_(a)
                self.B[i][slot, :, :r].copy_(b)
        return r

    def read(self, slot: int, rank: int) -> Adapter:
        """The adapter in ``slot`` at ``rank``, as detached fp32 CPU copies in PEFT format."""
        out: Adapter = {}
        for i, key in enumerate(self.keys):
            out[key + A_SUFFIX] = self.A[i][slot, :rank].detach().to("cpu", torch.float32).clone()
            out[key + B_SUFFIX] = self.B[i][slot, :, :rank].detach().to("cpu", torch.float32).clone()
        return out

    def pairs(self, slot: int) -> list[tuple[Tensor, Tensor]]:
        """(B, A) of every module in ``slot`` (live views: differentiable, all R components)."""
        return [(self.B[i][slot], self.A[i][slot]) for i in range(len(self.keys))]

    def factors(self, freeze_a: bool = False) -> list[nn.Parameter]:
        """The trainable tensors: every B, and every A unless A is frozen."""
        return list(self.B) if freeze_a else [p for pair in zip(self.A, self.B) for p in pair]
