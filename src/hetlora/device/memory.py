"""Process memory: measure it, and keep a training client's resident memory close to what it holds.

Two measured problems on a CPU client (``benchmarks/footprint.py``, one fresh process each):

* glibc keeps freed heap memory resident. Its *dynamic* mmap threshold rises each time a large
  mapped block is freed, after which activation-sized tensors (1–6 MB for SmolLM2) come from the
  heap; the holes freed temporaries leave between saved tensors stay resident: a SmolLM2 LoRA
  client peaked at 4.2 GB whose floor is 2.3 GB. ``--release-memory`` sets a fixed 64 KiB threshold
  (:func:`configure_allocator`, once per process), so every such tensor is its own mapping and is
  returned when freed: 2.7 GB, but each mapping is faulted in again, 1.4× the step time (2× with
  checkpointing, which allocates the layers twice), measured; so it stays opt-in.
* Activations (batch × length × hidden per op, every layer) are the same for LoRA and full
  fine-tuning and dominate both at batch 8 × 128 tokens. Gradient checkpointing keeps only each
  decoder layer's input and recomputes the rest in backward (one extra forward): on by default in
  a Flower ClientApp (a device).
"""

from __future__ import annotations

import ctypes
import functools
import resource
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint


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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 64 * 1024


_allocator: list[bool] = []  # the first call's result: the first setting made in a process stays


def configure_allocator(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every heap allocation above ``threshold`` bytes with its own mapping (glibc), once per process
    (``--release-memory``; the first setting made in a process stays). A fixed threshold turns glibc's
    dynamic adjustment off, so a freed tensor's pages go back at once, with no ``malloc_trim`` calls.
    False where there is no mallopt (not glibc)."""
    if not _allocator:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            _allocator.append(False)
        else:
            _allocator.append(bool(threshold) and bool(mallopt(M_MMAP_THRESHOLD, threshold)))  # 0: leave glibc's default
    return _allocator[0]


def trim_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``): what a device's setup parsed and
    dropped (the tokenizer's build, the federation's data) stays resident otherwise (~80 MB for SmolLM2 on
    chitchat, measured). False where there is no malloc_trim (not glibc)."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim(0)
    return True


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (the units gradient checkpointing uses)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextmanager
def lean_memory(model: torch.nn.Module, *, checkpointing: bool = False) -> Iterator[None]:
    """Train ``model`` inside this block with gradient checkpointing of every decoder layer when asked.

    Non-reentrant (so frozen embeddings need no input-grad trick), set on the layers the way Hugging
    Face documents for ``GradientCheckpointingLayer`` and undone on exit, so the shared model is unchanged.
    """
    layers = decoder_layers(model)
    checkpointed = [layer for layer in layers if checkpointing and not layer.gradient_checkpointing]
    for layer in checkpointed:
        layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        layer.gradient_checkpointing = True
    try:
        yield
    finally:
        for layer in checkpointed:
            del layer.gradient_checkpointing, layer._gradient_checkpointing_func
