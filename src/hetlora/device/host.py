"""The client host: what a device holds — the base model, its data and the local settings.

The in-process engine keeps one host for every simulated client and for the server's
held-out evaluation; a Flower ClientApp builds one per process and trains only the
client its node holds. Neither needs the server's state (hetlora.server.federation).

The host wraps its model with LoRA once (:class:`hetlora.device.lora.LoRABank`, created on
first use with as many slots as clients train together) and applies a method's base
delta (FLoRA, FedEx-LoRA) to pristine copies of the adapted weights.
"""

from __future__ import annotations

import functools
import random

import torch

from ..config import RunConfig
from ..core.base_delta import dense_delta, delta_modules
from .evaluate import evaluate_loss
from .lora import PEFT_PREFIX, LoRABank
from .memory import configure_allocator, trim_heap
from ..methods import METHODS
from .training import LocalConfig


def pick_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def native_bf16(device: str) -> bool:
    """Whether ``device`` multiplies bf16 natively: CUDA with bf16, or a CPU with AVX512-BF16 / AMX."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def resolve_precision(choice: str, device: str) -> str:
    """``auto`` → bf16 where the hardware has it natively, else fp32 (bf16 autocast on a CPU
    without bf16 units was ~25× slower than fp32 when measured)."""
    if choice == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return choice


def registered_clients(ids: list[str], cfg: RunConfig) -> list[str]:
    """The clients of the federation: all, the first ``max_clients``, or a ``client_pool`` drawn by the seed."""
    if cfg.client_pool:
        return sorted(random.Random(f"pool:{cfg.seed}").sample(ids, min(cfg.client_pool, len(ids))))
    return ids[: cfg.max_clients] if cfg.max_clients else list(ids)


def _registered_at(ids: list[str], cfg: RunConfig, index: int) -> list[str]:
    """The registered client at ``index`` (a node's partition), as a one-client list."""
    registered = registered_clients(ids, cfg)
    if not 0 <= index < len(registered):
        raise ValueError(f"partition-id {index} is outside the {len(registered)} clients of this federation")
    return [registered[index]]


def set_attention(model, device: str) -> None:
    """Eager attention on CPU, PyTorch's SDPA on CUDA.

    Measured on SmolLM2 (2 CPU cores, AVX512-BF16; benchmarks/throughput.py): a bf16 client step
    took 1.34 s with eager attention and 1.67 s with SDPA's CPU flash kernel (head dim 64, GQA).
    """
    choice = "sdpa" if device.startswith("cuda") else "eager"
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(choice)
    else:  # older transformers
        model.config._attn_implementation = choice


def auto_parallel_clients(host: ClientHost) -> int:
    """Clients to train together when not configured.

    On a CPU: one. Measured on 2 cores (benchmarks/throughput.py, SmolLM2, batch 8 × 128):
    one client's fp32 step already runs at 71–73 % of the matmul peak; eight clients together
    ran at 0.54–0.63× (fp32) and 0.77–0.96× (bf16) the client-steps per second of one at a time
    over three runs, two together at 1.04× (bf16): nothing to gain, and more memory used.
    On CUDA: as many as fit in 60 % of free GPU memory, one client's saved activations being
    ≈ batch × length × layers × (10·hidden + 5·intermediate) values, ×1.5 for temporaries
    (gradient checkpointing keeps about a fifth of that).
    """
    if not host.device.startswith("cuda"):
        return 1
    config = host.model.config
    hidden = getattr(config, "hidden_size", 1024)
    inter = getattr(config, "intermediate_size", 4 * hidden)
    layers = getattr(config, "num_hidden_layers", 12)
    cfg = host.cfg
    values = cfg.batch_size * cfg.max_length * layers * (10 * hidden + 5 * inter) * 1.5
    per_client = values * (2 if host.local.bf16 else 4) * (0.2 if host.local.grad_checkpointing else 1.0)
    return max(1, int(0.6 * torch.cuda.mem_get_info()[0] // max(per_client, 1)))


def check_rank_fits(model, cfg: RunConfig) -> None:
    """A LoRA rank above min(out, in) of an adapted layer adds parameters, not rank: refuse it (one line).

    (A global rank of 100000 on a hidden size of 64 was accepted and reached 20.7 GB.)"""
    from .lora import target_shapes

    if not METHODS[cfg.method].trains_rank_components:  # a dense client: no rank to check
        return
    shapes = target_shapes(model, cfg.target_modules)
    smallest = min(min(o, i) for o, i in shapes.values())
    if cfg.global_rank > smallest:
        raise ValueError(f"rank {cfg.global_rank} (r_max or --rank) exceeds {smallest}, the smallest dimension of the adapted "
                         f"layers ({', '.join(cfg.target_modules)}): a LoRA of that rank cannot be of full rank there")


class ClientHost:
    def __init__(self, cfg: RunConfig, model=None, tokenizer=None, data=None, device_client: bool = False,
                 own_client: int | None = None):
        """``own_client``: a lean device (``--release-memory`` on a SuperNode) keeps only the data of the
        registered client at that index (its partition) and gives its setup's freed heap back."""
        from ..models.loading import from_gguf, load_base_model

        if cfg.release_memory:
            configure_allocator()  # freed tensors go back to the OS at once (memory.py); before the model loads
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        if data is None and tokenizer is None:
            from ..models.loading import load_tokenizer

            tokenizer = load_tokenizer(cfg.model)
        if data is None:
            data = self._load_data(cfg, tokenizer, own_client)  # data errors before the model loads
        self.own_client = own_client
        self.base = cfg.base_for(device_client, from_gguf(cfg.model))  # docs/algorithm.md §7.1
        if model is None:
            model, tokenizer = load_base_model(cfg.model, tokenizer=tokenizer, base=self.base)
        check_rank_fits(model, cfg)  # before the model is moved, wrapped or any factor allocated
        self.model, self.tokenizer = model.to(self.device), tokenizer
        for p in self.model.parameters():
            p.requires_grad_(False)
        set_attention(self.model, self.device)
        self.data = data
        self.client_ids: list[str] = registered_clients(self.data.client_ids, cfg)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.local = LocalConfig.from_run(cfg, bf16=self.precision == "bf16", device_client=device_client)
        self.seed = cfg.seed
        self._bank: LoRABank | None = None
        self._bf16_frozen = False
        self._pristine: dict[str, torch.Tensor] = {}
        self._base_version: object = None
        self.device_client = device_client
        self._applied: dict[str, torch.Tensor] = {}  # a device client: the base delta its weights hold now
        if cfg.release_memory:
            trim_heap()

    @staticmethod
    def _load_data(cfg: RunConfig, tokenizer, own_client: int | None):
        from ..data import load_data

        keep = None if own_client is None else functools.partial(_registered_at, cfg=cfg, index=own_client)
        return load_data(cfg.data, tokenizer, keep=keep, **cfg.data_options())

    def hold_only(self, own_client: int) -> None:
        """Keep only the data of the registered client at ``own_client`` (a lean device asked for another
        partition, as a simulation's worker is): the data is reloaded, the model kept."""
        if own_client != self.own_client:
            self.data = self._load_data(self.cfg, self.tokenizer, own_client)
            self.own_client = own_client
            if self.cfg.release_memory:
                trim_heap()

    # ------------------------------------------------------------------ LoRA
    def bank(self, slots: int = 1, rank: int | None = None) -> LoRABank:
        """The run's LoRA wrap (hooked once), holding exactly ``slots`` slots of ``rank`` components
        (default: the global rank): a client's factors, gradients and moments are of its own size."""
        rank = rank or self.cfg.global_rank
        if self._bank is None:
            self._freeze_in_bf16()
            self._bank = LoRABank(self.model, self.local.targets, slots, rank, self.local.scale)
        elif (self._bank.slots, self._bank.rank) != (slots, rank):
            self._bank.resize(slots, rank)
        return self._bank

    def _freeze_in_bf16(self) -> None:
        """Under bf16 autocast, store the frozen linear weights of LoRA clients in bf16.

        Autocast casts an fp32 weight to bf16 before every matrix product, and it caches the
        cast only for weights that require grad — frozen base weights were cast again on every
        forward (~0.5 GB of copies per SmolLM2 step). Storing them in bf16 once gives the same
        numbers without the copies. Norms, embeddings and the LM head stay fp32; a method that
        folds updates into the base keeps fp32 originals to fold into. A model loaded from
        safetensors files has its bf16 weights read from them (never touching the memory-mapped
        fp32 pages, which would then stay resident: :func:`hetlora.models.loading.read_weights`).
        """
        from ..models.loading import read_weights

        if not self.local.bf16 or self._bf16_frozen:
            return
        keep_fp32 = self.cfg.folds_into_base
        head = self.model.get_output_embeddings()
        frozen = {path: module for path, module in self.model.named_modules()
                  if isinstance(module, torch.nn.Linear) and module is not head and module.weight.dtype == torch.float32}
        on_cpu = torch.device(self.device).type == "cpu"
        # a map is a CPU matter: on a GPU the weights were copied off it when the model moved
        from_file = read_weights(self.model, [f"{path}.weight" for path in frozen], torch.bfloat16) if on_cpu and not keep_fp32 else {}
        with torch.no_grad():
            for path, module in frozen.items():
                if keep_fp32:
                    self._pristine.setdefault(path, module.weight.detach().clone())
                weight = from_file.pop(f"{path}.weight", None)
                module.weight.data = module.weight.data.to(torch.bfloat16) if weight is None else weight
        self._bf16_frozen = True

    # ------------------------------------------------------------------ base delta
    def apply_base_delta(self, delta: dict[str, torch.Tensor] | None, version: object) -> None:
        """W = W0 + s·ΔW on every module ``delta`` touches; no-op if current.

        In-process, W0 is kept pristine (exact at every version). A device client (a ClientApp, whose
        weights are fp32 or kept fp32 for folding methods) keeps no copy of W0: it adds s·ΔW in place,
        and should the version change within its process, takes the applied s·ΔW off again first —
        405 MiB of pristine copies saved for SmolLM2 at the price of float rounding on that second
        application (a deployed SuperNode starts a fresh process per message, so it never happens there).
        """
        if version == self._base_version:
            return
        if self.device_client and not self.local.bf16 and not self._pristine:
            self._apply_in_place(delta or {})
        else:
            self._apply_from_pristine(delta or {})
        self._base_version = version

    def _apply_from_pristine(self, delta: dict[str, torch.Tensor]) -> None:
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for path, w0 in self._pristine.items():
                modules[path].weight.copy_(w0)
            for module in delta_modules(delta):
                path = module.removeprefix(PEFT_PREFIX)
                weight = modules[path].weight
                w0 = self._pristine.setdefault(path, weight.detach().clone())
                weight.copy_(w0.float() + self.local.scale * dense_delta(delta, module).to(weight.device))

    def _apply_in_place(self, delta: dict[str, torch.Tensor]) -> None:
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for module in delta_modules(self._applied):
                weight = modules[module.removeprefix(PEFT_PREFIX)].weight
                weight.sub_(self.local.scale * dense_delta(self._applied, module).to(weight.device))
            for module in delta_modules(delta):
                weight = modules[module.removeprefix(PEFT_PREFIX)].weight
                weight.copy_(weight.float() + self.local.scale * dense_delta(delta, module).to(weight.device))
        self._applied = dict(delta)

    # ------------------------------------------------------------------ evaluation
    def respond(self, examples, max_new_tokens: int) -> list[list[int]]:
        """Greedy responses of the host's model (as currently set up) to held-out prompts (device/generate.py)."""
        from .generate import greedy_responses

        return greedy_responses(self.model, examples, self.tokenizer.pad_token_id, self.end_ids(), max_new_tokens,
                                self.cfg.eval_batch_size, self.local.bf16)

    def end_ids(self) -> list[int]:
        """The tokens that end a response: the chat template's end of turn and the tokenizer's eos."""
        return sorted({i for i in (self.data.end_id, self.tokenizer.eos_token_id) if i is not None})

    def evaluate_loss(self, examples=None) -> float:
        """Mean target-token loss of the host's model (as currently set up) on held-out examples
        (default: the run's per-round evaluation set)."""
        if examples is None:
            examples = self.data.eval_examples(self.cfg.eval_split, self.cfg.eval_size)
        return evaluate_loss(self.model, examples, self.tokenizer.pad_token_id, self.cfg.eval_batch_size, self.local.bf16)
