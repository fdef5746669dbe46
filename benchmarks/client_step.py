"""Client step speed vs a plain PEFT loop, and peak memory of a LoRA vs an FFT client.

Same model (SmolLM2-135M-Instruct), same batches, same rank, same AdamW. Ours:
``hetlora.client.train_lora_client`` (LM head only at target positions, tail penalty on).
Plain: ``get_peft_model`` + ``model(**batch, labels=...)`` (full logits) + AdamW.
Memory: each client kind trains in a fresh subprocess and reports its peak RSS, for every
combination of heap release (hetlora.memory, on by default) and gradient checkpointing
(``--grad-checkpointing``, off by default). The FFT client's peak includes the global
weights it receives (a LoRA client receives only the adapter).

    python benchmarks/client_step.py [--steps 4] [--bf16-steps 1] [--rank 20] [--memory-only | --skip-memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def setup(model_name: str, client_index: int = 5):
    from hetlora.data import load_data
    from hetlora.models import load_base_model

    model, tok = load_base_model(model_name)
    for p in model.parameters():
        p.requires_grad_(False)
    data = load_data("chitchat", tok, max_length=128)
    cid = data.client_ids[client_index]
    return model, tok, cid, data.train_examples(cid)


def ours(model, tok, cid, examples, rank, steps, bf16, checkpointing=False, release_every=None) -> float:
    from hetlora.client import LocalConfig, train_lora_client
    from hetlora.lora import init_global_adapter

    start = init_global_adapter(model, rank, seed=0)
    cfg = LocalConfig(local_steps=steps, batch_size=8, lr=1e-3, bf16=bf16, grad_checkpointing=checkpointing,
                      release_memory_every=release_every)
    u = train_lora_client(model, tok, cid, examples, len(examples), start, rank, cfg, prune=True)
    return u.metrics["seconds"] / steps


def plain(model, tok, examples, rank, steps, bf16) -> float:
    from peft import get_peft_model

    from hetlora.client import batches
    from hetlora.data.federated import collate
    from hetlora.lora import lora_config

    t0 = time.perf_counter()
    peft_model = get_peft_model(model, lora_config(rank))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for group in batches(examples, 8, steps, gen):
        batch = collate(group, tok.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
    seconds = (time.perf_counter() - t0) / steps
    peft_model.unload()
    return seconds


def memory_child(kind: str, steps: int, checkpointing: bool, release_every: int | None) -> None:
    """Train one client and report the highest RSS seen while training (sampled every 5 ms)."""
    import gc
    import threading

    from hetlora.client import LocalConfig, trainable_state, train_fft_client, train_lora_client
    from hetlora.memory import rss_mb
    from hetlora.lora import init_global_adapter

    model, tok, cid, examples = setup("smollm2")
    gc.collect()
    start = trainable_state(model) if kind == "fft" else init_global_adapter(model, 50, 0)
    before = rss_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cfg = LocalConfig(local_steps=steps, batch_size=8, grad_checkpointing=checkpointing, release_memory_every=release_every)
    if kind == "lora":
        u = train_lora_client(model, tok, cid, examples, len(examples), start, 50, cfg, prune=True)
    else:
        u = train_fft_client(model, tok, cid, examples, len(examples), start, cfg)
    done.set()
    sampler.join()
    print(json.dumps({"kind": kind, "peak_rss_mb": peak[0], "after_load_mb": before, "s_per_step": u.metrics["seconds"] / steps}))


def memory_peaks(steps: int) -> None:
    print(f"peak RSS while training (MB), fresh process per client, {steps} steps of batch 8 x 128 tokens, LoRA r=50:")
    print(f"{'heap release':>13} {'checkpointing':>13} {'LoRA':>6} {'FFT':>6} {'LoRA/FFT':>8}   training adds (LoRA, FFT)   s/step (LoRA, FFT)")
    from hetlora.memory import RELEASE_EVERY_LAYERS

    for release in (None, RELEASE_EVERY_LAYERS):
        for checkpointing in (False, True):
            peaks = {}
            for kind in ("lora", "fft"):
                cmd = [sys.executable, __file__, "--memory-child", kind, "--steps", str(steps), "--release-every", str(release or 0)]
                out = subprocess.run(cmd + (["--grad-checkpointing"] if checkpointing else []), capture_output=True, text=True, check=True)
                peaks[kind] = json.loads(out.stdout.strip().splitlines()[-1])
            lora, fft = peaks["lora"], peaks["fft"]
            print(f"{f'every {release}' if release else 'off':>13} {'on' if checkpointing else 'off':>13} {lora['peak_rss_mb']:6.0f} {fft['peak_rss_mb']:6.0f} "
                  f"{lora['peak_rss_mb'] / fft['peak_rss_mb']:8.2f}   ({lora['peak_rss_mb'] - lora['after_load_mb']:5.0f}, "
                  f"{fft['peak_rss_mb'] - fft['after_load_mb']:5.0f})            ({lora['s_per_step']:.2f}, {fft['s_per_step']:.2f})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--bf16-steps", type=int, default=1, help="0 skips the bf16 timing")
    p.add_argument("--rank", type=int, default=20)
    p.add_argument("--memory-child", choices=["lora", "fft"])
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--release-every", type=int, default=0, help="memory child: release the heap every k layers, 0 = off")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.steps, args.grad_checkpointing, args.release_every or None)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SmolLM2-135M-Instruct, batch 8, max length 128, rank {args.rank}")
    if not args.memory_only:
        model, tok, cid, examples = setup("smollm2")
        ours(model, tok, cid, examples, args.rank, 1, False)  # warm-up
        runs = [("fp32", False, args.steps)] + ([("bf16 autocast", True, args.bf16_steps)] if args.bf16_steps else [])
        for label, bf16, steps in runs:
            s_plain = plain(model, tok, examples, args.rank, steps, bf16)
            s_ours = ours(model, tok, cid, examples, args.rank, steps, bf16)
            print(f"{label:>14}: ours {s_ours:.2f} s/step, plain PEFT {s_plain:.2f} s/step, throughput ours/plain = {s_plain / s_ours:.2f}", flush=True)
        s_ckpt = ours(model, tok, cid, examples, args.rank, args.steps, False, checkpointing=True)
        print(f"{'fp32':>14}: ours with gradient checkpointing {s_ckpt:.2f} s/step", flush=True)
        from hetlora.memory import RELEASE_EVERY_LAYERS

        s_release = ours(model, tok, cid, examples, args.rank, args.steps, False, release_every=RELEASE_EVERY_LAYERS)
        s_again = ours(model, tok, cid, examples, args.rank, args.steps, False)
        print(f"{'fp32':>14}: ours with heap release every {RELEASE_EVERY_LAYERS} layers {s_release:.2f} s/step, without (again) {s_again:.2f} s/step", flush=True)
        del model
    if not args.skip_memory:
        memory_peaks(args.memory_steps)


if __name__ == "__main__":
    main()
