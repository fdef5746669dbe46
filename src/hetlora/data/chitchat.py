"""Chit-Chat (BYU PCC; PyPI ``chitchat-dataset``): 7,168 real conversations, one client per sender.

A turn is one sender's consecutive utterances. An example is the previous ``context``
turns as the prompt (this sender's turns as ``assistant``, the other's as ``user``) and
this sender's turn as the target. Senders with fewer than ``min_examples`` training turns
are dropped (default 20 → about 500 clients).

**The split is by conversation, for every sender at once** (:data:`SPLIT_VERSION`): each
conversation lies wholly in train, validation or test, so neither side of a held-out
conversation is ever trained on, by its sender or by the other one. (Split version 1 split
each sender's conversations on their own: the other side of 64 % of held-out conversations
was in some client's training data, and validation and test shared conversations.)
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
from pathlib import Path

from .federated import FederatedData, RawExample

SPLIT_VERSION = "conversation-v2"  # recorded in every result's provenance


def chitchat_path() -> Path:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default data needs the PyPI package chitchat-dataset")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset.json"


def conversation_examples(messages: list[list[dict]], context: int) -> list[tuple[str, RawExample]]:
    """``(sender, example)`` for every turn after the first of one conversation."""
    turns = [(m[0]["sender"], " ".join(u["text"].strip() for u in m if u["text"].strip())) for m in messages if m]
    out = []
    for i in range(1, len(turns)):
        sender, target = turns[i]
        if not target:
            continue
        prompt = tuple(
            ("assistant" if s == sender else "user", text) for s, text in turns[max(0, i - context) : i] if text
        )
        out.append((sender, RawExample(prompt, target)))
    return out


@functools.lru_cache(maxsize=2)
def examples_by_sender(path: str, context: int) -> dict[str, dict[str, tuple[RawExample, ...]]]:
    """sender -> conversation -> that sender's examples, parsed once per process (read-only)."""
    data = json.loads(Path(path).read_text())
    per_sender: dict[str, dict[str, list[RawExample]]] = {}
    for conv_id, conv in data.items():
        for sender, example in conversation_examples(conv["messages"], context):
            per_sender.setdefault(sender, {}).setdefault(conv_id, []).append(example)
    return {s: {c: tuple(e) for c, e in convs.items()} for s, convs in per_sender.items()}


def conversation_sides(conversation_ids, test_fraction: float, seed: int) -> dict[str, str]:
    """conversation -> ``train`` | ``validation`` | ``test``: a seeded shuffle of all conversations,
    ``test_fraction`` of them held out and split evenly between validation and test."""
    ids = sorted(conversation_ids)
    random.Random(f"conversation-split:{seed}").shuffle(ids)
    n_heldout = round(test_fraction * len(ids))
    n_test = n_heldout // 2
    sides = {c: "test" for c in ids[:n_test]}
    sides |= {c: "validation" for c in ids[n_test:n_heldout]}
    return sides | {c: "train" for c in ids[n_heldout:]}


def load_chitchat(
    tokenizer,
    *,
    min_examples: int = 20,
    context: int = 3,
    test_fraction: float = 0.2,
    max_length: int = 128,
    eval_size: int = 256,
    seed: int = 0,
    path: str | Path | None = None,
    cached: bool = True,
) -> FederatedData:
    """``cached=False`` parses the file without keeping the parse for the next call (a lean device)."""
    parse = examples_by_sender if cached else examples_by_sender.__wrapped__
    per_sender = parse(str(path or chitchat_path()), context)
    sides = conversation_sides({c for convs in per_sender.values() for c in convs}, test_fraction, seed)
    split: dict[str, dict[str, list[RawExample]]] = {"train": {}, "validation": {}, "test": {}}
    for sender, convs in per_sender.items():
        parts: dict[str, list[RawExample]] = {"train": [], "validation": [], "test": []}
        for conv_id in sorted(convs):
            parts[sides[conv_id]] += convs[conv_id]
        if len(parts["train"]) >= min_examples:
            for side, examples in parts.items():
                split[side][sender] = examples
    if not split["train"]:
        raise ValueError(f"chitchat: no sender has {min_examples} training examples")
    return FederatedData("chitchat", split["train"], split["test"], tokenizer, max_length, eval_size, seed,
                         validation=split["validation"], split_version=SPLIT_VERSION)
