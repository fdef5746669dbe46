"""What a round reports, one row of metrics.jsonl: its clients, the rank health of the global adapter, its
held-out evaluation (docs/algorithm.md §3 for live and trainable rank).

Functions of a :class:`hetlora.server.federation.Federation` (read, never changed), so the server's round
stays about aggregation and this room about what is written down.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from typing import Any, Iterable, Mapping, Sequence

from ..core.adapter import ClientUpdate
from ..core.rank_health import live_rank, rank_energy, trainable_rank
from ..device.evaluate import perplexity


def client_metrics(kept: Sequence[ClientUpdate]) -> dict[str, Any]:
    """What the round reports of its clients' own measurements (train loss, time, memory)."""
    losses = [u.metrics.get("train_loss") for u in kept]
    losses = [x for x in losses if isinstance(x, (int, float)) and math.isfinite(x)]
    return {
        "train_loss": sum(losses) / len(losses) if losses else None,
        "client_seconds": sum(float(u.metrics.get("seconds", 0.0)) for u in kept),
        "peak_rss_mb": max((float(u.metrics.get("peak_rss_mb", 0.0)) for u in kept), default=0.0),
    }


def round_row(fed, round_index: int, aggregated: bool, rejected: str | None, kept: Sequence[ClientUpdate],
              replied: Iterable[str | None], dropped: list[dict[str, Any]], sent: Mapping[str, int], bytes_up: int) -> dict[str, Any]:
    """The round's row (before evaluation): who took part, who was dropped and why, ranks in and out, bytes up.
    ``kept``: the aggregated updates (their tensors may be gone: a streamed round); ``replied``: every replying
    client's id."""
    return rank_metrics(fed) | {
        "rejected": rejected,
        "round": round_index + 1,
        "method": fed.cfg.method,
        "clients": [u.client_id for u in kept],
        "aggregated": aggregated,
        "dropped": dropped,
        "ranks": {c: fed.ranks[c] for c in sorted({c for c in replied if c in fed.ranks})},  # after the round
        "client_ranks_in": {u.client_id: sent.get(u.client_id) for u in kept},
        "bytes_up": bytes_up,
    } | client_metrics(kept)


def rank_metrics(fed) -> dict[str, Any]:
    """Live rank, trainable rank and rank energy of the global adapter (kinds with rank tiers only)."""
    if not fed.kind.rank_tiers:
        return {}
    global_adapter = fed.state["global"]
    r = fed.cfg.global_rank
    mid = max(fed.cfg.r_min, min(r, int(statistics.median(fed.assigned.values())) if fed.assigned else r))
    return {"live_rank": live_rank(global_adapter), "trainable_rank": trainable_rank(global_adapter),
            "rank_energy": rank_energy(global_adapter, min(fed.cfg.r_min, r), mid, r)}


def eval_metrics(fed, with_tiers: bool, final: bool = False) -> dict[str, Any]:
    """The round's evaluation; after the last round also the final set (``final_eval_size``), tiers on it."""
    t0 = time.perf_counter()
    loss = next(iter(fed.evaluate().values()))
    row: dict[str, Any] = {"eval_loss": loss, "eval_ppl": perplexity(loss)}
    examples = None
    if final and fed.cfg.final_eval_size:
        examples = fed.data.eval_examples(fed.cfg.eval_split, fed.cfg.final_eval_size)
        final_loss = next(iter(fed.evaluate(examples=examples).values()))
        row.update({"full_eval_loss": final_loss, "full_eval_ppl": perplexity(final_loss), "full_eval_size": len(examples)})
    if final and fed.cfg.rouge_size and math.isfinite(loss):  # a non-finite model is rolled back, then scored
        row.update(rouge_metrics(fed))
    if with_tiers and fed.tiers:
        top = fed.cfg.global_rank  # the global model itself: reuse its loss on the same examples
        tiers = fed.evaluate([r for r in fed.tiers if r != top], examples) if any(r != top for r in fed.tiers) else {}
        if top in fed.tiers:
            tiers[top] = final_loss if examples is not None else loss
        row["tier_eval_ppl"] = {str(r): perplexity(tiers[r]) for r in sorted(tiers)}
    row["eval_seconds"] = time.perf_counter() - t0
    return row


def rouge_metrics(fed) -> dict[str, Any]:
    """ROUGE-L (mean F-measure) of the global model's greedy responses to ``rouge_size`` held-out prompts of the
    evaluation split, against each conversation's real next turn (docs/algorithm.md §10)."""
    from ..device.generate import prompt_and_reference
    from .rouge import rouge_l

    cfg = fed.cfg
    examples = fed.data.eval_examples(cfg.eval_split, cfg.rouge_size)
    responses = next(iter(fed.evaluate(examples=examples, measure=lambda host, ex: host.respond(ex, cfg.rouge_max_tokens)).values()))
    decode = functools.partial(fed.host.tokenizer.decode, skip_special_tokens=True)
    references = [decode(prompt_and_reference(e, fed.host.end_ids())[1]) for e in examples]
    return {"rouge_l": rouge_l(references, [decode(r) for r in responses]), "rouge_size": len(examples),
            "rouge_max_tokens": cfg.rouge_max_tokens}
