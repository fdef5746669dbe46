"""Did a change alter what runs compute? Tiny runs of every method from two source trees, compared.

    python benchmarks/behaviour_check.py --before /path/to/old/src [--after src] [--json out.json]
    python benchmarks/behaviour_check.py --smoke    # this tree against itself, hetlora: must be identical (tests)

Each tree runs, in a process of its own, a 2-round tiny-model run of every registered method (seed 0,
pruning on, 2 clients a round); the metrics (timings and memory left out) and the final adapter are
compared: identical bytes, or the largest absolute difference of any metric or adapter element.
A refactor must give identical bytes; a memory change may differ by float rounding only (issue #25:
≤ 1e-6 on these runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TIMING = {"seconds", "client_seconds", "eval_seconds", "peak_rss_mb", "server_rss_mb", "seconds_total"}


def run_all(out: Path, methods: list[str] | None = None) -> None:
    """In this process (the tree on PYTHONPATH): one tiny run per method (every registered one by default) under ``out``."""
    from hetlora.config import RunConfig
    from hetlora.methods import METHODS
    try:
        from hetlora.server.runner import run
    except ImportError:  # a tree from before the package layout (#41)
        from hetlora.runner import run

    for method in methods or METHODS:
        cfg = RunConfig(model="tiny", data="chitchat", method=method, client_pool=4, clients_per_round=2, rounds=2, local_steps=2,
                        batch_size=2, max_length=32, eval_size=4, final_eval_size=8, r_min=2, r_max=6, min_examples=200,
                        tiers=[2, 6], seed=0, lr=1e-2, out=str(out / method))
        run(cfg, progress=False)


def numbers(run_dir: Path) -> tuple[list, dict]:
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted((run_dir / "adapter").glob("*.safetensors")) if (run_dir / "adapter").is_dir() else []:
        tensors.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return rows, tensors


def flat(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flat(v, f"{prefix}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from flat(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


def compare(before: Path, after: Path) -> dict:
    out = {}
    for run_dir in sorted(p for p in before.iterdir() if p.is_dir()):
        a_rows, a_t = numbers(run_dir)
        b_rows, b_t = numbers(after / run_dir.name)
        worst, other, relative, worst_field = 0.0, [], 0.0, None
        for (ka, va), (kb, vb) in zip(flat(a_rows), flat(b_rows)):
            if ka != kb or type(va) is not type(vb):
                other.append(ka)
            elif isinstance(va, float):
                worst = max(worst, abs(va - vb))
                rel = abs(va - vb) / max(abs(va), abs(vb)) if va != vb else 0.0
                if rel > relative:
                    relative, worst_field = rel, ka
            elif va != vb:
                other.append(ka)
        shared = [k for k in a_t if k in b_t and a_t[k].shape == b_t[k].shape]
        tensor_worst = max((float((a_t[k] - b_t[k]).abs().max()) for k in shared), default=0.0)
        tensor_relative = max((float((a_t[k] - b_t[k]).norm() / max(float(a_t[k].norm()), 1e-30)) for k in shared), default=0.0)
        same_keys = set(a_t) == set(b_t) and all(a_t[k].shape == b_t[k].shape for k in a_t)
        identical = not other and same_keys and worst == 0.0 and all(a_t[k].equal(b_t[k]) for k in a_t)
        out[run_dir.name] = {"identical": identical, "metric_max_abs_diff": worst, "adapter_max_abs_diff": tensor_worst,
                             "metric_max_rel_diff": relative, "metric_max_rel_field": worst_field,
                             "adapter_max_rel_diff": tensor_relative,  # per tensor: ‖a − b‖ / ‖a‖, the largest
                             "differing_fields": other[:5], "adapter_keys_match": same_keys}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", type=Path)
    p.add_argument("--after", type=Path, default=Path("src"))
    p.add_argument("--json", type=Path)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--methods", nargs="+", default=None, help="these methods only (default: every registered one)")
    p.add_argument("--smoke", action="store_true", help="this tree against itself, hetlora: identical bytes or a failure")
    args = p.parse_args()
    if args.child:
        run_all(args.child, args.methods)
        return
    if args.smoke:
        args.before, args.methods = args.after, ["hetlora"]
    if args.before is None:
        p.error("--before (the source tree to compare with) is required")
    with tempfile.TemporaryDirectory() as tmp:
        for name, tree in (("before", args.before), ("after", args.after)):
            env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
            child = subprocess.run([sys.executable, __file__, "--child", str(Path(tmp) / name)] + (["--methods", *args.methods] if args.methods else []),
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if child.returncode:
                raise SystemExit(f"the runs of the {name} tree ({tree}) failed:\n{child.stderr[-3000:]}")
        result = compare(Path(tmp) / "before", Path(tmp) / "after")
    for method, r in result.items():
        verdict = "identical" if r["identical"] else (
            f"metrics ±{r['metric_max_abs_diff']:.2e} (relative {r['metric_max_rel_diff']:.1e}, {r['metric_max_rel_field']}), "
            f"adapter ±{r['adapter_max_abs_diff']:.2e} (relative {r['adapter_max_rel_diff']:.1e})")
        print(f"{method:>20}: {verdict}" + (f"; fields differ: {r['differing_fields']}" if r["differing_fields"] else ""))
    if args.json:
        from hetlora.provenance import environment

        report = {"provenance": environment("cpu"), "before": str(args.before), "after": str(args.after), "methods": result}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.smoke and not all(r["identical"] for r in result.values()):
        raise SystemExit("the same tree gave different numbers twice: a run is not reproducible")


if __name__ == "__main__":
    main()
