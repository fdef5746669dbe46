"""Throughput of a round's clients: sequential vs trained together, fp32 vs auto precision.

One process, one run, nothing else on the cores. For a round of ``--clients`` SmolLM2
clients (batch 8 × 128 by default, LoRA rank ``--rank``) it reports client-steps per second
trained one at a time and all together (one LoRA bank with a slot per client), in fp32 and
in ``--precision auto`` (bf16 where the hardware has it natively); this machine's matmul
peak measured in the same run (torch.mm 2048² in fp32 and bf16; 8192² too on CUDA), so a
client step can be stated as a fraction of it; and the non-training share of a full round
(sampling, payloads, validation, aggregation, held-out evaluation, checkpoint).

    python benchmarks/throughput.py [--clients 8] [--steps 2] [--model smollm2] [--json FILE]

FLOPs of a client step: 4·N·T for the decoder (forward 2N per token, backward to the
activations 2N; the frozen weights need no weight gradient) with N the non-embedding
parameters and T the tokens actually processed (padded), plus 4·d·V per target token
for the LM head (applied only at targets) — LoRA's own work (~2·R(in+out) per token and
layer) is counted too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n × n × n matrix product."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class TokenCounter:
    """Counts padded tokens and target tokens that go through the decoder while training."""

    def __init__(self, model):
        self.tokens = 0
        self.handle = model.get_decoder().register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if torch.is_grad_enabled():
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.tokens += ids.numel()

    def remove(self):
        self.handle.remove()


def step_flops(model, tokens: int, targets: int, rank: int) -> float:
    config = model.config
    embed = config.vocab_size * config.hidden_size
    n = sum(p.numel() for p in model.parameters()) - embed
    lora = sum((m.in_features + m.out_features) * rank for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return 4.0 * (n + lora) * tokens + 4.0 * config.hidden_size * config.vocab_size * targets


def make_host(args, precision: str):
    from hetlora.config import RunConfig
    from hetlora.device.host import ClientHost

    cfg = RunConfig(model=args.model, max_length=args.max_length, batch_size=args.batch_size, local_steps=args.steps,
                    r_min=args.rank, r_max=args.rank, precision=precision, lr=1e-3, seed=0, client_pool=args.clients,
                    eval_size=args.eval_size, min_examples=20)
    return cfg, ClientHost(cfg)


def jobs_for(host, rank: int):
    from hetlora.clients import Job
    from hetlora.core.adapter import B_SUFFIX
    from hetlora.device.lora import lora_init, target_shapes

    start = lora_init(target_shapes(host.model, host.local.targets), rank, 0)
    start = {k: (v + 0.01) if k.endswith(B_SUFFIX) else v for k, v in start.items()}  # a non-zero B, as after round 1
    return [Job(cid, rank, 0, start) for cid in host.client_ids]


def time_training(host, jobs, together: bool, rank: int) -> dict:
    from hetlora.clients import get_kind

    kind = get_kind("lora")
    kind.train(host, jobs[:2] if together else jobs[:1], prune=True)  # warm-up (allocator, kernels)
    counter = TokenCounter(host.model)
    sync(host.device)
    t = time.perf_counter()
    if together:
        kind.train(host, jobs, prune=True)
    else:
        for job in jobs:
            kind.train(host, [job], prune=True)
    sync(host.device)
    seconds = time.perf_counter() - t
    counter.remove()
    steps = len(jobs) * host.local.local_steps
    targets = sum(sum(1 for l in e.labels if l != -100) for job in jobs for e in host.data.train_examples(job.client_id)) / sum(
        len(host.data.train_examples(job.client_id)) for job in jobs) * host.local.batch_size * steps
    flops = step_flops(host.model, counter.tokens, int(targets), rank)
    return {"seconds": seconds, "client_steps_per_s": steps / seconds, "tokens": counter.tokens, "gflop_per_s": flops / seconds / 1e9}


def round_share(args, precision: str) -> dict:
    """One full round (sample → payloads → train → validate → aggregate → evaluate → checkpoint)."""
    from hetlora.server.checkpoint import save_checkpoint
    from hetlora.config import RunConfig
    from hetlora.server.federation import Federation
    from hetlora.server.runner import Progress, evaluate_round, local_round

    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(model=args.model, max_length=args.max_length, batch_size=args.batch_size, local_steps=args.steps,
                        precision=precision, client_pool=args.clients, clients_per_round=args.clients, rounds=2,
                        eval_size=args.eval_size, out=out, seed=0, tier_eval="off",
                        **({"r_min": 2, "r_max": args.rank} if args.smoke else {}))
        fed = Federation(cfg)
        bar = Progress(False, 2, 0)
        local_round(fed, 0, bar)  # warm-up round
        t = time.perf_counter()
        row = local_round(fed, 1, bar)
        train_seconds = row["client_seconds"]
        row.update(evaluate_round(fed, 1, row))
        save_checkpoint(Path(out) / "checkpoint", fed.round, fed.state_tensors(), fed.state_json())
        total = time.perf_counter() - t
    return {"round_seconds": total, "train_seconds": train_seconds, "eval_seconds": row["eval_seconds"],
            "non_training_share": 1 - train_seconds / total, "parallel_clients": fed.parallel_clients}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rank", type=int, default=20)
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--precisions", default="fp32,auto")
    p.add_argument("--skip-round", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 clients, 1 step: seconds, for the test suite")
    args = p.parse_args()
    if args.smoke:
        args.model, args.clients, args.steps, args.batch_size, args.max_length, args.rank = "tiny", 2, 1, 2, 32, 4
        args.eval_size, args.precisions = 4, "fp32"

    from hetlora.device.host import pick_device, resolve_precision
    from hetlora.provenance import environment

    device = pick_device("auto")
    report: dict = {**environment(device), "threads": torch.get_num_threads(), "args": vars(args), "peak_gflops": {}, "runs": {}}
    for dtype in (torch.float32, torch.bfloat16):
        report["peak_gflops"][f"cpu mm 2048 {dtype}"] = (matmul_peak("cpu", dtype, n=256, repeats=1) if args.smoke
                                                         else matmul_peak("cpu", dtype))
        if device == "cuda":
            report["peak_gflops"][f"cuda mm 2048 {dtype}"] = matmul_peak("cuda", dtype)
            report["peak_gflops"][f"cuda mm 8192 {dtype}"] = matmul_peak("cuda", dtype, 8192)
    for name, value in report["peak_gflops"].items():
        print(f"peak {name}: {value:,.0f} GFLOP/s", flush=True)

    for choice in args.precisions.split(","):
        precision = resolve_precision(choice, device)
        _, host = make_host(args, precision)
        jobs = jobs_for(host, args.rank)
        for together in (False, True):
            label = f"{choice}={precision} {'together' if together else 'sequential'}"
            r = time_training(host, jobs, together, args.rank)
            report["runs"][label] = r
            print(f"{label:>28}: {r['client_steps_per_s']:.3f} client-steps/s ({r['seconds']:.1f} s, {r['gflop_per_s']:,.0f} GFLOP/s, "
                  f"{r['tokens']:,} tokens)", flush=True)
        if not args.skip_round:
            share = round_share(args, precision)
            report["runs"][f"{choice}={precision} round"] = share
            print(f"{choice}={precision} round of {args.clients}: {share['round_seconds']:.1f} s, training {share['train_seconds']:.1f} s, "
                  f"evaluation {share['eval_seconds']:.1f} s → non-training share {100 * share['non_training_share']:.1f} % "
                  f"({share['parallel_clients']} client(s) at a time)", flush=True)
        del host

    runs = report["runs"]
    fp32_peak = report["peak_gflops"][f"{device} mm 2048 torch.float32"]
    seq32, par32 = runs.get("fp32=fp32 sequential"), runs.get("fp32=fp32 together")
    auto = [k for k in runs if k.startswith("auto=") and k.endswith("together")]
    summary = {}
    if seq32 and par32:
        summary["fp32 together / sequential"] = par32["client_steps_per_s"] / seq32["client_steps_per_s"]
        summary["fp32 step / fp32 mm peak"] = max(seq32["gflop_per_s"], par32["gflop_per_s"]) / fp32_peak
    for key in auto:
        seq = runs[key.replace("together", "sequential")]
        summary[f"{key.split()[0]} together / sequential"] = runs[key]["client_steps_per_s"] / seq["client_steps_per_s"]
        if par32:
            summary[f"{key.split()[0]} / fp32 (together)"] = runs[key]["client_steps_per_s"] / par32["client_steps_per_s"]
    report["summary"] = summary
    for name, value in summary.items():
        print(f"{name}: {value:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
