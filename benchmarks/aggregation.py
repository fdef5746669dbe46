"""Aggregation speed on SmolLM2-135M-shaped adapters (core issue).

20 clients, 30 layers x 7 linear modules (q,o 576x576; k,v 192x576; gate,up 1536x576;
down 576x1536), ranks spread over 5..50, r_max 50. Prints ms per call for every method
and for a plain vectorised loop doing hetlora's arithmetic (norms by the trace trick,
weighted zero-padded sum) without validation or plumbing, and checks that hetlora never
materialises an out x in matrix.

The SVD methods' floor: the same stacked factors, only the Gram matrices (the cheaper way,
as recon-svd forms them) and their eigenvalues, no vectors, in float64 (what recon-svd
computes in) and float32. No exact dense route can do less than this work.

    python benchmarks/aggregation.py [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hetlora import METHODS, ClientUpdate, aggregate, truncate_adapter
from hetlora.core.adapter import A_SUFFIX, B_SUFFIX

MODULES = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}


def make_adapter(rank: int, seed: int, layers: int = 30) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers):
        for name, (o, i) in MODULES.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            out[key + A_SUFFIX] = torch.randn(rank, i, generator=g) * 0.02
            out[key + B_SUFFIX] = torch.randn(o, rank, generator=g) * 0.02
    return out


def plain_hetlora(updates, r_max, gram_dtype=torch.float32):
    """HetLoRA's rule as one plain loop (no validation, no plumbing). ``gram_dtype``: float32 Gram matrices
    (the loop this benchmark has always used) or float64 ones, as hetlora forms them (docs/algorithm.md §2.3)."""
    keys = [k[: -len(A_SUFFIX)] for k in updates[0].adapter if k.endswith(A_SUFFIX)]
    norms = []
    for u in updates:
        total = torch.zeros((), dtype=torch.float64)
        for m in keys:
            b, a = u.adapter[m + B_SUFFIX], u.adapter[m + A_SUFFIX]
            if gram_dtype == torch.float64:
                b, a = b.double(), a.double()
            total += ((b.T @ b).double() * (a @ a.T).double()).sum()
        norms.append(float(total.sqrt()))
    s = sum(norms)
    p = [n / s for n in norms]
    out = {}
    for m in keys:
        b0, a0 = updates[0].adapter[m + B_SUFFIX], updates[0].adapter[m + A_SUFFIX]
        acc_b = torch.zeros(b0.shape[0], r_max)
        acc_a = torch.zeros(r_max, a0.shape[1])
        for w, u in zip(p, updates):
            b, a = u.adapter[m + B_SUFFIX], u.adapter[m + A_SUFFIX]
            r = a.shape[0]
            acc_b[:, :r].add_(b, alpha=w)
            acc_a[:r].add_(a, alpha=w)
        out[m + B_SUFFIX], out[m + A_SUFFIX] = acc_b, acc_a
    return out


def svd_floor(updates, dtype):
    """Seconds to form every module's Gram of Σ q_k B_k A_k and take its eigenvalues (no eigenvectors)."""
    from hetlora.methods.base import data_weights, per_module_factors
    from hetlora.methods.recon_svd import smaller_gram

    q = data_weights(updates)
    stacks = [(torch.cat([w * b.to(dtype) for w, (b, _) in zip(q, f)], 1), torch.cat([a.to(dtype) for _, a in f]))
              for f in per_module_factors(updates).values()]
    start = time.perf_counter()
    for b, a in stacks:
        torch.linalg.eigvalsh(smaller_gram(b, a)[0])
    return time.perf_counter() - start


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-svd", action="store_true", help="skip the SVD methods (recon-svd, flexlora, rb-lora)")
    parser.add_argument("--json", default=None, help="also write the figures (and commit, device, library versions) here")
    parser.add_argument("--smoke", action="store_true", help="1 layer, 4 clients, 1 repeat: seconds, for the test suite")
    args = parser.parse_args()
    r_max = 50
    clients, layers = (4, 1) if args.smoke else (20, 30)
    if args.smoke:
        args.repeats = 1
    ranks = [round(5 + i * 45 / (clients - 1)) for i in range(clients)]
    full = make_adapter(r_max, 0, layers)
    updates = [ClientUpdate({k: v + 0.001 * k_i for k, v in truncate_adapter(full, r).items()}, 10 + k_i, f"c{k_i}") for k_i, r in enumerate(ranks)]
    homog = [ClientUpdate(truncate_adapter(u.adapter, 25) if r >= 25 else truncate_adapter(full, 25), u.num_examples, u.client_id) for u, r in zip(updates, ranks)]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {clients} clients, ranks {ranks}, r_max {r_max}")

    plain = timed(lambda: plain_hetlora(updates, r_max), args.repeats)
    plain64 = timed(lambda: plain_hetlora(updates, r_max, torch.float64), args.repeats)
    results = {"plain loop (hetlora arithmetic, no validation)": plain,
               "plain loop, float64 Grams (hetlora before #41)": plain64}
    svd_methods = ("recon-svd", "flexlora", "rb-lora")
    for m in [name for name in METHODS if name not in ("fft", "fedavg")]:
        if args.skip_svd and m in svd_methods:
            continue
        results[m] = timed(lambda m=m: aggregate(m, updates, r_max, previous=full, seed=0, round_index=0), 1 if m in svd_methods else args.repeats)
    results["fedavg (homogeneous r=25)"] = timed(lambda: aggregate("fedavg", homog, r_max), args.repeats)
    results["hetlora + norm_bound 1.5"] = timed(lambda: aggregate("hetlora", updates, r_max, norm_bound=1.5), args.repeats)

    if not args.skip_svd:
        for dtype in (torch.float64, torch.float32):
            svd_floor(updates, dtype)  # warm-up
            floor = statistics.median(svd_floor(updates, dtype) for _ in range(max(1, args.repeats)))
            results[f"SVD floor: Grams + eigenvalues only, {str(dtype)[6:]}"] = floor * 1000

    for name, ms in results.items():
        print(f"{name:>48}: {ms:9.1f} ms")
    print(f"hetlora / plain loop = {results['hetlora'] / plain:.2f}x; / plain loop with float64 Grams = {results['hetlora'] / plain64:.2f}x")

    ours, reference = aggregate("hetlora", updates, r_max), plain_hetlora(updates, r_max)
    assert all(torch.allclose(ours[k], reference[k], atol=1e-6) for k in ours), "hetlora differs from the plain loop"
    probe = LargestOutput()
    with probe:
        aggregate("hetlora", updates, r_max)
    smallest_dense = min(o * i for o, i in MODULES.values())
    print(f"largest tensor hetlora creates: {probe.largest:,} elements (smallest out x in is {smallest_dense:,})")
    assert probe.largest < smallest_dense, "hetlora built an out x in sized tensor"
    if args.json:
        from hetlora.provenance import environment

        report = {**environment("cpu"), "threads": torch.get_num_threads(), "args": vars(args), "ranks": ranks,
                  "ms_per_call": results, "largest_hetlora_tensor": probe.largest}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
