"""A frozen linear layer whose weight stays in a GGUF's own quantised blocks (docs/algorithm.md §7.1).

A device runs the quantised GGUF itself (llama.cpp). Training LoRA over the *same blocks* trains the adapter
against exactly the base the device runs, and the process never holds a dense copy of the model: a
:class:`QuantisedLinear` keeps the blocks (uint8, ``[out, bytes per row]``, 4.5 bits a weight for Q4_0)
and dequantises them a chunk of rows at a time inside the forward and again inside the backward. Nothing
dense is saved for the backward: the weight is frozen, so only the input's gradient is formed,
grad_x = grad_y · W, from the blocks once more.

Dequantisation is transformers' torch implementation (``transformers.integrations.gguf.dequant``, maintained
with its GGUF loader) for the types it has; Q5_0 and Q5_1, which llama.cpp uses in Q4_K_M files for rows
whose length is not a multiple of 256 (Qwen2.5-0.5B's 896), are read here. Every type is tested against the
``gguf`` package's reference dequantiser (numpy, the format's own definition in Python).
"""

from __future__ import annotations

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor, nn

#: ggml type ids (``enum ggml_type``), the ones a LoRA base may be stored in.
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = (int(GGMLQuantizationType[name]) for name in (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
SUPPORTED = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
NAMES = {t: GGMLQuantizationType(t).name for t in SUPPORTED}
#: ggml type -> (values per block, bytes per block), as the gguf package defines the format
BLOCKS = {t: GGML_QUANT_SIZES[GGMLQuantizationType(t)] for t in SUPPORTED}
#: dense values alive at once while one layer dequantises (16 MiB of fp32): a layer's dense weight never exists whole.
CHUNK_VALUES = 1 << 22


def type_problem(ggml_type: int, in_features: int) -> str | None:
    """Why a weight of this type and row length cannot be a quantised base (None: it can)."""
    if ggml_type not in BLOCKS:
        return f"ggml type {ggml_type} is not a supported base type ({', '.join(NAMES.values())})"
    per_block = BLOCKS[ggml_type][0]
    if in_features <= 0 or in_features % per_block:
        return f"{NAMES[ggml_type]} rows hold multiples of {per_block} values, not {in_features}"
    return None


def row_bytes(ggml_type: int, in_features: int) -> int:
    per_block, size = BLOCKS[ggml_type]
    return in_features // per_block * size


def dequantise(blocks: Tensor, ggml_type: int, in_features: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[rows, bytes per row]`` uint8 blocks -> ``[rows, in_features]`` values of ``dtype``."""
    rows = blocks.shape[0]
    if ggml_type in (Q5_0, Q5_1):
        return _q5(blocks.reshape(-1, BLOCKS[ggml_type][1]), ggml_type == Q5_1).to(dtype).reshape(rows, in_features)
    from transformers.integrations.gguf.dequant import dequantize

    return dequantize(blocks.reshape(-1), ggml_type, dtype).reshape(rows, in_features)


def _q5(blocks: Tensor, with_min: bool) -> Tensor:
    """Q5_0 / Q5_1: an fp16 scale (and minimum), 32 high bits, 16 bytes of low nibbles per block of 32."""
    scale = blocks[:, 0:2].contiguous().view(torch.float16).float()
    start = 4 if with_min else 2
    high_bits = blocks[:, start : start + 4].contiguous().view(torch.int32)
    high = (high_bits >> torch.arange(32, dtype=torch.int32)) & 1
    low = blocks[:, start + 4 : start + 20]
    low = torch.cat([low & 0x0F, low >> 4], dim=1).to(torch.int32)
    quants = low | (high << 4)
    if with_min:
        return scale * quants + blocks[:, 2:4].contiguous().view(torch.float16).float()
    return scale * (quants - 16)


def row_chunks(out_features: int, in_features: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_VALUES // in_features)
    return [(start, min(start + step, out_features)) for start in range(0, out_features, step)]


class _BlockMatmul(torch.autograd.Function):
    """y = x Wᵀ with W read from its blocks; the backward forms grad_x only, from the blocks again."""

    @staticmethod
    def forward(ctx, x: Tensor, blocks: Tensor, ggml_type: int, in_features: int) -> Tensor:
        ctx.save_for_backward(blocks)
        ctx.ggml_type, ctx.in_features = ggml_type, in_features
        out = x.new_empty(x.shape[0], blocks.shape[0])
        for start, stop in row_chunks(blocks.shape[0], in_features):
            out[:, start:stop] = x @ dequantise(blocks[start:stop], ggml_type, in_features, x.dtype).T
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (blocks,) = ctx.saved_tensors
        grad_x = grad_out.new_zeros(grad_out.shape[0], ctx.in_features)
        for start, stop in row_chunks(blocks.shape[0], ctx.in_features):
            grad_x.addmm_(grad_out[:, start:stop], dequantise(blocks[start:stop], ctx.ggml_type, ctx.in_features, grad_out.dtype))
        return grad_x, None, None, None


class QuantisedLinear(nn.Module):
    """A frozen ``nn.Linear`` (y = x Wᵀ + b) whose W stays in GGUF blocks; trains nothing itself, passes gradients on."""

    def __init__(self, blocks: Tensor, ggml_type: int, in_features: int, bias: Tensor | None = None):
        super().__init__()
        problem = type_problem(ggml_type, in_features) or _blocks_problem(blocks, ggml_type, in_features)
        if problem:
            raise ValueError(problem)
        self.in_features, self.out_features, self.ggml_type = in_features, blocks.shape[0], ggml_type
        self.register_buffer("blocks", blocks)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        out = _BlockMatmul.apply(flat, self.blocks, self.ggml_type, self.in_features)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, ggml_type: int) -> "QuantisedLinear":
        """``linear``'s weight quantised into ``ggml_type`` blocks by the gguf package (the types it can write:
        Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); for tests and for a dense model a device will run quantised."""
        from gguf import GGMLQuantizationType, quants

        problem = type_problem(ggml_type, linear.in_features)
        if problem:
            raise ValueError(problem)
        blocks = quants.quantize(linear.weight.detach().float().cpu().numpy(), GGMLQuantizationType(ggml_type))
        return cls(torch.from_numpy(blocks), ggml_type, linear.in_features, linear.bias)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W itself, ``[out, in]`` (the dense path, merging, checks): the same values the forward uses."""
        return dequantise(self.blocks, self.ggml_type, self.in_features, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={NAMES[self.ggml_type]}"


#: logits alive at once in :func:`block_cross_entropy` (16 MiB of fp32): a vocabulary of 151,936 never has its N × V logits
LOGIT_VALUES = 1 << 22


def vocab_chunks(vocab: int, in_features: int, tokens: int) -> list[tuple[int, int]]:
    """Rows of the head per chunk: at most CHUNK_VALUES dequantised weights and LOGIT_VALUES logits at once."""
    step = max(1, min(CHUNK_VALUES // in_features, LOGIT_VALUES // max(tokens, 1)))
    return [(start, min(start + step, vocab)) for start in range(0, vocab, step)]


class _BlockCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits = h Wᵀ with W in blocks, a chunk of the vocabulary at a time.

    The forward keeps a running log-sum-exp and the target's logit (one pass over the head's blocks); the backward
    recomputes each chunk's logits, softmax − one-hot, and adds its share of grad_h (a second pass). Neither the
    N × V logits nor a dense head ever exist: at most one chunk of each. Saved: h, the labels and the N log-sum-exps.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, labels: Tensor, blocks: Tensor, ggml_type: int, in_features: int) -> Tensor:
        n = hidden.shape[0]
        running_max = torch.full((n,), float("-inf"), device=hidden.device)
        total = torch.zeros(n, device=hidden.device)
        target = torch.zeros(n, device=hidden.device)
        rows = torch.arange(n, device=hidden.device)
        for start, stop in vocab_chunks(blocks.shape[0], in_features, n):
            logits = (hidden @ dequantise(blocks[start:stop], ggml_type, in_features, hidden.dtype).T).float()
            new_max = torch.maximum(running_max, logits.max(dim=1).values)
            total = total * torch.exp(running_max - new_max) + torch.exp(logits - new_max[:, None]).sum(dim=1)
            running_max = new_max
            inside = (labels >= start) & (labels < stop)
            target[inside] = logits[rows[inside], labels[inside] - start]
        log_sum_exp = running_max + torch.log(total)
        ctx.save_for_backward(hidden, labels, log_sum_exp, blocks)
        ctx.ggml_type, ctx.in_features = ggml_type, in_features
        return log_sum_exp - target

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        hidden, labels, log_sum_exp, blocks = ctx.saved_tensors
        n = hidden.shape[0]
        grad_hidden = torch.zeros(n, ctx.in_features, device=hidden.device)
        rows = torch.arange(n, device=hidden.device)
        for start, stop in vocab_chunks(blocks.shape[0], ctx.in_features, n):
            weight = dequantise(blocks[start:stop], ctx.ggml_type, ctx.in_features, hidden.dtype)
            probs = torch.exp((hidden @ weight.T).float() - log_sum_exp[:, None])
            inside = (labels >= start) & (labels < stop)
            probs[rows[inside], labels[inside] - start] -= 1.0
            probs.mul_(grad_loss.float()[:, None])
            grad_hidden.addmm_(probs, weight.float())  # in fp32 whatever the compute dtype (a no-op cast in fp32)
        return grad_hidden.to(hidden.dtype), None, None, None, None


def block_cross_entropy(head: "QuantisedLinear", hidden: Tensor, labels: Tensor) -> Tensor:
    """Per-token cross-entropy of ``head(hidden)`` against ``labels`` without the logits or the head ever dense."""
    if head.bias is not None:
        raise ValueError("a quantised LM head with a bias is not supported")
    return _BlockCrossEntropy.apply(hidden, labels, head.blocks, head.ggml_type, head.in_features)


class QuantisedEmbedding(nn.Module):
    """A frozen embedding table kept in GGUF blocks: only the looked-up rows are dequantised.

    ``scale`` multiplies the rows (Gemma's embeddings are scaled by √hidden). The table needs no gradient: a LoRA
    branch never adapts it, and nothing below it trains.
    """

    def __init__(self, blocks: Tensor, ggml_type: int, embedding_dim: int, scale: float = 1.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        problem = type_problem(ggml_type, embedding_dim) or _blocks_problem(blocks, ggml_type, embedding_dim)
        if problem:
            raise ValueError(problem)
        self.num_embeddings, self.embedding_dim, self.ggml_type = blocks.shape[0], embedding_dim, ggml_type
        self.scale, self.dtype = scale, dtype
        self.register_buffer("blocks", blocks)

    def forward(self, ids: Tensor) -> Tensor:
        rows = dequantise(self.blocks[ids.reshape(-1)], self.ggml_type, self.embedding_dim, self.dtype)
        if self.scale != 1.0:  # as Gemma's scaled embedding: the scale in the table's dtype
            rows = rows * torch.tensor(self.scale, dtype=self.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def head(self) -> QuantisedLinear:
        """The tied LM head over the same blocks (no second copy): logits = h Eᵀ."""
        return QuantisedLinear(self.blocks, self.ggml_type, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={NAMES[self.ggml_type]}"


def _blocks_problem(blocks: Tensor, ggml_type: int, in_features: int) -> str | None:
    if not isinstance(blocks, Tensor) or blocks.dtype != torch.uint8 or blocks.dim() != 2:
        return "blocks must be a 2-D uint8 tensor [out_features, bytes per row]"
    if blocks.shape[1] != row_bytes(ggml_type, in_features):
        return (f"{NAMES[ggml_type]} rows of {in_features} values take {row_bytes(ggml_type, in_features)} bytes, "
                f"the blocks have {blocks.shape[1]}")
    return None
