"""Client step speed vs a plain PEFT loop, and peak memory of a LoRA vs an FFT client.

Same model (SmolLM2-135M-Instruct), same batches, same rank, same AdamW. Ours:
the LoRA client kind through a ClientHost, as in a run (LM head only at target positions, tail penalty on).
Plain: ``get_peft_model`` + ``model(**batch, labels=...)`` (full logits) + AdamW.
Memory: each client kind trains in a fresh subprocess and reports its peak RSS, for every
combination of heap release (``--release-memory``) and gradient checkpointing
(``--grad-checkpointing``), both off by default. The FFT client's peak includes the global
weights it receives (a LoRA client receives only the adapter).

    python benchmarks/client_step.py [--steps 4] [--bf16-steps 1] [--rank 20] [--memory-only | --skip-memory] [--json F]
    python benchmarks/client_step.py --smoke     # the tiny model, one step, rank 4: seconds (the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def make_host(rank: int, steps: int, precision: str = "fp32", checkpointing: bool = False, release: bool = False,
              model: str = "smollm2"):
    """A SmolLM2 client host (the code both engines train with) and one client's job at ``rank``."""
    from hetlora.clients import Job
    from hetlora.config import RunConfig
    from hetlora.core.adapter import B_SUFFIX
    from hetlora.device.host import ClientHost
    from hetlora.device.lora import lora_init, target_shapes

    cfg = RunConfig(model=model, max_length=128, batch_size=8, local_steps=steps, r_min=rank, r_max=rank, lr=1e-3,
                    precision=precision, seed=0, client_pool=8, min_examples=20, grad_checkpointing=checkpointing,
                    release_memory=release)
    host = ClientHost(cfg)
    start = lora_init(target_shapes(host.model, host.local.targets), rank, 0)
    start = {k: (v + 0.01) if k.endswith(B_SUFFIX) else v for k, v in start.items()}  # a non-zero B, as after round 1
    return host, Job(host.client_ids[5 % len(host.client_ids)], rank, 0, start)


def ours(host, job) -> float:
    """Seconds per step of hetlora's LoRA client (LoRA bank, LM head at targets only, tail penalty on)."""
    from hetlora.clients import get_kind

    (u,) = get_kind("lora").train(host, [job], prune=True)
    return u.metrics["seconds"] / host.local.local_steps


def plain(host, job, bf16: bool) -> float:
    """Seconds per step of a plain PEFT loop on its own copy of the model: full logits, the same batches and AdamW."""
    from peft import get_peft_model

    from hetlora.data.federated import collate
    from hetlora.device.lora import lora_config
    from hetlora.models.loading import load_base_model
    from hetlora.device.training import batches

    model, tok = load_base_model(host.cfg.model)
    examples = host.data.train_examples(job.client_id)
    steps = host.local.local_steps
    t0 = time.perf_counter()
    peft_model = get_peft_model(model, lora_config(job.rank, host.local.scale, host.local.targets))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for group in batches(examples, host.local.batch_size, steps, torch.Generator().manual_seed(0)):
        batch = collate(group, tok.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - t0) / steps


def memory_child(kind_name: str, steps: int, checkpointing: bool, release: bool, model: str, rank: int) -> None:
    """Train one client of ``kind_name`` and report the highest RSS seen while training (sampled every 5 ms)."""
    import gc
    import threading

    from hetlora.clients import Job, get_kind
    from hetlora.device.memory import rss_mb

    host, job = make_host(rank, steps, "fp32", checkpointing, release, model)
    kind = get_kind(kind_name)
    payload = kind.payload(kind.initial_state(host, rank, 0), job.client_id, rank, 0, 0)  # FFT: the global weights
    job = Job(job.client_id, rank, 0, payload)
    gc.collect()
    before = rss_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    (u,) = kind.train(host, [job], prune=True)
    done.set()
    sampler.join()
    print(json.dumps({"kind": kind_name, "peak_rss_mb": peak[0], "after_load_mb": before, "s_per_step": u.metrics["seconds"] / steps}))


def memory_peaks(steps: int, model: str, rank: int, combos: list[tuple[bool, bool]]) -> list[dict]:
    """Peak RSS of a LoRA and an FFT client for each (heap release, gradient checkpointing) in ``combos``."""
    print(f"peak RSS while training (MB), fresh process per client, {steps} steps of batch 8 x 128 tokens, LoRA r={rank}:")
    print(f"{'heap release':>13} {'checkpointing':>13} {'LoRA':>6} {'FFT':>6} {'LoRA/FFT':>8}   training adds (LoRA, FFT)   s/step (LoRA, FFT)")
    rows = []
    for release, checkpointing in combos:
        peaks = {}
        for kind in ("lora", "fft"):
            cmd = [sys.executable, __file__, "--memory-child", kind, "--steps", str(steps), "--model", model,
                   "--memory-rank", str(rank)] + (["--release-memory"] if release else [])
            out = subprocess.run(cmd + (["--grad-checkpointing"] if checkpointing else []), capture_output=True, text=True, check=True)
            peaks[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        lora, fft = peaks["lora"], peaks["fft"]
        rows.append({"release_memory": release, "checkpointing": checkpointing, "lora": lora, "fft": fft})
        print(f"{'on' if release else 'off':>13} {'on' if checkpointing else 'off':>13} {lora['peak_rss_mb']:6.0f} {fft['peak_rss_mb']:6.0f} "
              f"{lora['peak_rss_mb'] / fft['peak_rss_mb']:8.2f}   ({lora['peak_rss_mb'] - lora['after_load_mb']:5.0f}, "
              f"{fft['peak_rss_mb'] - fft['after_load_mb']:5.0f})            ({lora['s_per_step']:.2f}, {fft['s_per_step']:.2f})", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--bf16-steps", type=int, default=1, help="0 skips the bf16 timing")
    p.add_argument("--rank", type=int, default=20)
    p.add_argument("--memory-child", choices=["lora", "fft"])
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--release-memory", action="store_true", help="memory child: return freed memory to the OS (release_memory)")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-rank", type=int, default=50)
    p.add_argument("--model", default="smollm2", help="smollm2 (the figures), tiny (the smoke mode) or a local HF model")
    p.add_argument("--smoke", action="store_true", help="the tiny model, 1 step, rank 4: seconds, for the test suite")
    p.add_argument("--json", type=Path, default=None, help="also write the figures (and commit, device, library versions) here")
    args = p.parse_args()
    if args.smoke:
        args.model, args.steps, args.bf16_steps, args.rank, args.memory_steps, args.memory_rank = "tiny", 1, 0, 4, 1, 4
    if args.memory_child:
        memory_child(args.memory_child, args.steps, args.grad_checkpointing, args.release_memory, args.model, args.memory_rank)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}, batch 8, max length 128, rank {args.rank}")
    figures: dict = {"s_per_step": {}}
    if not args.memory_only:
        for label, precision, steps in [("fp32", "fp32", args.steps)] + ([("bf16", "bf16", args.bf16_steps)] if args.bf16_steps else []):
            host, job = make_host(args.rank, steps, precision, model=args.model)
            ours(host, job)  # warm-up
            s_ours, s_plain = ours(host, job), plain(host, job, precision == "bf16")
            print(f"{label:>5}: ours {s_ours:.2f} s/step, plain PEFT {s_plain:.2f} s/step, throughput ours/plain = {s_plain / s_ours:.2f}", flush=True)
            figures["s_per_step"][label] = {"ours": s_ours, "plain_peft": s_plain}
        variants = () if args.smoke else (("gradient checkpointing", {"checkpointing": True}), ("heap release", {"release": True}))
        for label, options in variants:  # (the smoke mode's memory child runs with both)
            host, job = make_host(args.rank, args.steps, "fp32", model=args.model, **options)
            ours(host, job)  # warm-up
            figures["s_per_step"][f"fp32 with {label}"] = seconds = ours(host, job)
            print(f" fp32: ours with {label} {seconds:.2f} s/step", flush=True)
    if not args.skip_memory:
        every = [(release, checkpointing) for release in (False, True) for checkpointing in (False, True)]
        combos = [(True, True)] if args.smoke else every  # the smoke mode: both flags at once
        figures["peak_rss"] = memory_peaks(args.memory_steps, args.model, args.memory_rank, combos)
    if args.json:
        from hetlora.provenance import environment

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**environment("cpu"), "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()},
                                         **figures}, indent=1))


if __name__ == "__main__":
    main()
