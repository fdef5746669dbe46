"""A LoRA base in GGUF blocks (#42): how fast the blocks dequantise, and what a training step over them costs.

1. Dequantisation speed per block type (values per second, one SmolLM2 MLP weight 576 x 1536 at a time), ours
   (hetlora.models.quantised: transformers' torch dequantiser, Q5_0/Q5_1 our own) against the gguf package's
   numpy reference.
2. One decoder layer's seven linear maps (SmolLM2-135M shapes), a forward and a backward to the input as LoRA
   training does (batch x tokens rows), over dense fp32 weights and over the same weights in Q4_0, Q8_0, Q4_K
   and Q6_K blocks (a K type falls back to Q5_0 where a row is not a multiple of 256 values, as llama.cpp's Q4_K_M
   does for SmolLM2's 576): seconds per pass and the ratio to dense; and the bytes each holds.

    python benchmarks/quantised_base.py [--rows 1024] [--repeats 5] [--json F]
    python benchmarks/quantised_base.py --smoke --json F    # small shapes, one repeat (tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from hetlora.models import quantised as blocks_module
from hetlora.models.quantised import NAMES, QuantisedLinear, dequantise

LAYER = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576), "gate_proj": (1536, 576),
         "up_proj": (1536, 576), "down_proj": (576, 1536)}  # (out, in) of one SmolLM2-135M decoder layer
TYPES = [blocks_module.Q4_0, blocks_module.Q5_0, blocks_module.Q8_0, blocks_module.Q4_K, blocks_module.Q6_K]
QUANTISABLE = {blocks_module.Q4_0, blocks_module.Q4_1, blocks_module.Q5_0, blocks_module.Q5_1, blocks_module.Q8_0}


def blocks_of(weight: np.ndarray, ggml_type: int, rng: np.random.Generator) -> np.ndarray:
    """The weight quantised by the gguf package; K types (which it cannot write) as random blocks of the right size."""
    if ggml_type in QUANTISABLE:
        return quants.quantize(weight, GGMLQuantizationType(ggml_type))
    per_block, size = blocks_module.BLOCKS[ggml_type]
    out = rng.integers(0, 256, (weight.size // per_block, size), dtype=np.uint8)
    for offset in {blocks_module.Q4_K: (0, 2), blocks_module.Q6_K: (208,)}[ggml_type]:
        out[:, offset : offset + 2] = np.full((out.shape[0], 1), 0.001, dtype=np.float16).view(np.uint8)
    return out.reshape(weight.shape[0], -1)


def quantised_layer(weight: np.ndarray, ggml_type: int, rng: np.random.Generator) -> QuantisedLinear:
    if weight.shape[1] % blocks_module.BLOCKS[ggml_type][0]:
        ggml_type = blocks_module.Q5_0  # llama.cpp's fallback for rows a K block does not divide
    return QuantisedLinear(torch.from_numpy(blocks_of(weight, ggml_type, rng)), ggml_type, weight.shape[1])


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def dequant_speed(shape: tuple[int, int], repeats: int) -> dict:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape).astype(np.float32) * 0.05
    out = {}
    for t in TYPES:
        blocks = blocks_of(weight, t, rng)
        ours = timed(lambda: dequantise(torch.from_numpy(blocks), t, shape[1]), repeats)
        numpy_ref = timed(lambda: quants.dequantize(blocks, GGMLQuantizationType(t)), max(1, repeats // 2))
        out[NAMES[t]] = {"ours_values_per_s": weight.size / ours, "gguf_numpy_values_per_s": weight.size / numpy_ref}
        print(f"dequantise {NAMES[t]:>5}: ours {weight.size / ours / 1e6:8.1f} M values/s, gguf numpy {weight.size / numpy_ref / 1e6:7.1f} M/s")
    return out


def layer_step(rows: int, repeats: int, layer: dict[str, tuple[int, int]]) -> dict:
    """Forward + backward to the input through every map of one layer, dense vs each block type."""
    rng = np.random.default_rng(1)
    weights = {n: rng.standard_normal(s).astype(np.float32) * 0.05 for n, s in layer.items()}
    inputs = {n: torch.randn(rows, s[1], requires_grad=True) for n, s in layer.items()}

    def step(modules):
        for n, m in modules.items():
            m(inputs[n]).sum().backward()

    dense = {n: torch.nn.Linear(w.shape[1], w.shape[0], bias=False) for n, w in weights.items()}
    for n, m in dense.items():
        m.weight.data.copy_(torch.from_numpy(weights[n]))
        m.weight.requires_grad_(False)
    results = {"dense fp32": {"seconds": timed(lambda: step(dense), repeats), "bytes": sum(w.nbytes for w in weights.values())}}
    for t in TYPES:
        layers = {n: quantised_layer(w, t, rng) for n, w in weights.items()}
        results[NAMES[t]] = {"seconds": timed(lambda: step(layers), repeats), "bytes": sum(m.blocks.numel() for m in layers.values())}
    base = results["dense fp32"]["seconds"]
    for name, r in results.items():
        r["over_dense"] = r["seconds"] / base
        print(f"one layer, {rows} rows, forward + backward to x: {name:>10} {r['seconds'] * 1e3:8.1f} ms ({r['over_dense']:.2f}x dense), "
              f"weights {r['bytes'] / 2**20:6.2f} MiB")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1024, help="batch x tokens (8 x 128 is a client step)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="small shapes, one repeat: for the test suite")
    args = p.parse_args()
    shape, layer = (576, 1536), LAYER
    if args.smoke:
        args.rows, args.repeats, shape = 16, 1, (64, 256)
        layer = {"q_proj": (64, 256), "down_proj": (256, 256)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    figures = {"dequantise": dequant_speed(shape, args.repeats), "layer_step": layer_step(args.rows, args.repeats, layer)}
    if args.json:
        from hetlora.provenance import environment

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**environment("cpu"), "threads": torch.get_num_threads(), "args": vars(args) | {"json": str(args.json)},
                                         **figures}, indent=1))


if __name__ == "__main__":
    main()
