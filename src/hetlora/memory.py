"""Process memory: measure it, and keep a training client's resident memory close to what
it really holds.

Two measured problems on a CPU client (``benchmarks/client_step.py --memory-only``):

* glibc keeps freed heap memory resident. PEFT's LoRA forward frees three output-sized
  temporaries per linear layer (base output, ``B(A x)``, its scaled copy) between tensors
  kept for backward; the holes are not reused before the heap grows, so a SmolLM2 LoRA
  client reached ~3.8 GB RSS while holding ~2 GB. ``malloc_trim(0)`` hands the free pages
  back (also those in the middle of the heap); calling it every few decoder layers, forward
  and backward, caps what the holes cost at a few layers' worth. The price: every released
  page that is used again faults and is zeroed by the kernel (1.24–1.37× the time per
  SmolLM2 step, measured), so it is opt-in.
* Activations (batch × length × hidden per op, every layer) are the same for LoRA and full
  fine-tuning and dominate both at batch 8 × 128 tokens. Gradient checkpointing keeps only
  each decoder layer's input and recomputes the rest in backward (one extra forward).
"""

from __future__ import annotations

import ctypes
import functools
import resource
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

# --release-memory: after every 3rd decoder layer. On SmolLM2 this peaked at the same RSS as
# after every layer (2.75 vs 2.68-2.75 GB), with a third of the calls.
RELEASE_EVERY_LAYERS = 3


def rss_mb() -> float:
    """Current resident memory of this process (MB), from /proc when available."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on macOS and musl
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS; False where the allocator has no such call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 64 * 1024


_allocator: list[bool] = []  # the first call's result: the first setting made in a process stays


def configure_allocator(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every heap allocation above ``threshold`` bytes with its own mapping (glibc), once per process.

    glibc raises its mmap threshold each time a large mapped block is freed (up to 32 MiB), after
    which the step's activation-sized tensors come from the heap, whose freed holes stay resident:
    a SmolLM2 LoRA client peaked at 4.2 GB holding 2.3 GB (benchmarks/footprint.py). A fixed
    threshold turns that adjustment off, so a freed tensor's pages go back at once — without the
    malloc_trim calls (``--release-memory``) that cost 1.24–1.37× the step. False where there is no
    mallopt (not glibc)."""
    if not _allocator:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            _allocator.append(False)
        else:
            _allocator.append(bool(threshold) and bool(mallopt(M_MMAP_THRESHOLD, threshold)))  # 0: leave glibc's default
    return _allocator[0]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (the units gradient checkpointing uses)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _release_before_backward(grad: torch.Tensor) -> None:
    release_free_heap()


def _release_after_forward(module, args, output) -> None:
    release_free_heap()
    hidden = output[0] if isinstance(output, tuple) else output
    if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
        hidden.register_hook(_release_before_backward)


@contextmanager
def lean_memory(model: torch.nn.Module, *, release_every: int | None = None, checkpointing: bool = False) -> Iterator[None]:
    """Train ``model`` inside this block with less resident memory.

    ``release_every=k``: release the free heap after every k-th decoder layer's forward and
    just before its backward (a hook on its output's gradient); ``None`` turns it off.
    ``checkpointing``: gradient checkpointing of every decoder layer, non-reentrant (so frozen
    embeddings need no input-grad trick). Set on the layers the way Hugging Face documents
    for ``GradientCheckpointingLayer`` and undone on exit, so the shared model is unchanged.
    """
    layers = decoder_layers(model)
    releasing = layers[release_every - 1 :: release_every] if release_every else []
    handles = [layer.register_forward_hook(_release_after_forward) for layer in releasing]
    checkpointed = [layer for layer in layers if checkpointing and not layer.gradient_checkpointing]
    for layer in checkpointed:
        layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        layer.gradient_checkpointing = True
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer in checkpointed:
            del layer.gradient_checkpointing, layer._gradient_checkpointing_func
