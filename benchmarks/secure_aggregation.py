"""What SecAgg+ costs HetLoRA: bytes up per round and seconds, against the same round in the clear.

    python benchmarks/secure_aggregation.py [--model smollm2] [--clients 3] [--rounds 2] [--json PATH]

Two runs of the same config through the ServerApp over an in-process grid (each node's messages go
to its ClientApp in this process: Flower's SecAgg+ workflow and mod do all the protocol work, only
the network is skipped): one plain, one ``--secure-aggregation``; both with ``--norm-bound off`` (the
median bound needs individual norms). Per round it reports: the bytes every client's replies carry
(serialised Flower messages, all protocol stages; the masked vector alone as well), the round's
seconds, and how far the secure aggregate is from the plain one (relative Frobenius norm) and the
eval loss (relative) and perplexity. Under SecAgg+ every client pads to the round's covered rank r_c
(the m-th largest rank sent; components fewer than m clients hold are not sent, docs/algorithm.md
§6.1) and sends 8-byte masked integers instead of its r_k-rank fp32 factors: the aggregate and
perplexity differences are what the covered rank and the mandatory clip cost.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 round, 1 step: seconds, for the test suite")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.rounds, args.local_steps = "tiny", 1, 1

    import torch
    from flwr.common.serde import message_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    from hetlora.config import RunConfig
    from hetlora.server.federation import Federation
    from hetlora.flower.server_app import serve
    from hetlora.provenance import environment
    from tests.flower.loopback import LoopbackGrid

    provenance = environment("cpu")
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 0  # what Flower's runtime sets

    class Metered(LoopbackGrid):
        """Counts the serialised bytes of every reply (what the nodes upload) and the server's wall time per call."""

        def __init__(self, partitions):
            super().__init__(partitions, fresh_process=False)
            self.up = 0

        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            self.up += sum(message_to_proto(r).ByteSize() for r in replies)
            return replies

    aggregates: dict[str, list[dict[str, torch.Tensor]]] = {"plain": [], "secure": []}
    apply = Federation._apply
    current = {"name": "plain"}

    def recording(self, round_index, new, base_update, kept):
        aggregates[current["name"]].append({k: v.clone() for k, v in new.items()})
        return apply(self, round_index, new, base_update, kept)

    Federation._apply = recording
    small = args.model == "tiny"
    base = dict(model=args.model, rounds=args.rounds, clients_per_round=args.clients, max_clients=args.clients,
                local_steps=args.local_steps, norm_bound=None, seed=0, precision="fp32",
                **(dict(r_min=2, r_max=6, batch_size=2, max_length=48, eval_size=4, min_examples=400) if small else
                   dict(r_min=5, r_max=50, eval_size=16)))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        current["name"] = "warm-up"  # one plain round first: model load, allocator and kernels warm for both timed runs
        aggregates["warm-up"] = []
        serve(Metered(args.clients), RunConfig(**(base | {"rounds": 1}), out=str(Path(tmp) / "warm-up")))
        for name, secure in (("plain", False), ("secure", True)):
            current["name"] = name
            grid = Metered(args.clients)
            serve(grid, RunConfig(**base, out=str(Path(tmp) / name), secure_aggregation=secure))
            rows = [json.loads(line) for line in (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()]
            results[name] = {"rows": rows, "reply_bytes_all": grid.up}
    plain, secure = results["plain"]["rows"], results["secure"]["rows"]
    per_round = []
    for t, (p, s, ga, gb) in enumerate(zip(plain, secure, aggregates["plain"], aggregates["secure"])):
        num = sum(float((ga[k].double() - gb[k].double()).pow(2).sum()) for k in ga)
        den = sum(float(ga[k].double().pow(2).sum()) for k in ga)
        per_round.append({
            "round": t + 1, "ranks_sent": p["client_ranks_in"],
            "bytes_up_plain": p["bytes_up"], "bytes_up_secure_masked_vectors": s["bytes_up"],
            "seconds_plain": p["seconds"], "seconds_secure": s["seconds"], "secagg_protocol_seconds": s["secure_seconds"],
            "aggregate_relative_error": (num / den) ** 0.5,
            "eval_loss_plain": p["eval_loss"], "eval_loss_secure": s["eval_loss"],
            "eval_loss_relative_error": abs(p["eval_loss"] - s["eval_loss"]) / p["eval_loss"],
            "ppl_plain": math.exp(p["eval_loss"]), "ppl_secure": math.exp(s["eval_loss"]),
            "secure_rank": s.get("secure_rank"), "secure_min_clients": s.get("secure_min_clients"), "secure_clip": s.get("secure_clip"),
        })
    report = {"provenance": provenance, "config": base, "per_round": per_round,
              "reply_bytes_all_stages": {k: v["reply_bytes_all"] for k, v in results.items()}}
    for row in per_round:
        print(f"round {row['round']}: bytes up plain {row['bytes_up_plain']:,} vs secure {row['bytes_up_secure_masked_vectors']:,} "
              f"(x{row['bytes_up_secure_masked_vectors'] / row['bytes_up_plain']:.2f}); seconds {row['seconds_plain']:.1f} vs "
              f"{row['seconds_secure']:.1f} (protocol {row['secagg_protocol_seconds']:.1f}); aggregate rel. error "
              f"{row['aggregate_relative_error']:.2e}, eval loss rel. error {row['eval_loss_relative_error']:.2e}; "
              f"ppl {row['ppl_plain']:.3f} vs {row['ppl_secure']:.3f}; covered rank {row['secure_rank']} of ranks "
              f"{row['ranks_sent']} (m = {row['secure_min_clients']}, clip {row['secure_clip']:.3g})")
    print("all replies, all stages (serialised):", report["reply_bytes_all_stages"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
