"""The federated dataset container, tokenisation with target-only labels, and batching."""

from __future__ import annotations

import gc
import pickle
import random
from dataclasses import dataclass, field
from typing import Callable

import torch

IGNORE = -100
CHARS_PER_TOKEN = 32  # an upper bound on the characters of one BPE token, for cutting long strings


@dataclass(frozen=True)
class RawExample:
    """``prompt``: chat messages before the target (may be empty); ``target``: what to learn."""

    prompt: tuple[tuple[str, str], ...]
    target: str


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def end_of_turn_id(tokenizer) -> int | None:
    """The token that closes an assistant turn in the tokenizer's chat template, else its eos.

    Found by rendering a conversation and reading the first token after the assistant's
    text, so it is the template's own end of turn (SmolLM2: ``<|im_end|>``), whatever a
    converter set as eos. It must be a special token; otherwise eos is used.
    """
    if getattr(tokenizer, "chat_template", None):
        probe = "hetlora end of turn probe"
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        if isinstance(text, str) and probe in text:
            tail = text[text.rindex(probe) + len(probe):]
            ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
            if ids and ids[0] in set(tokenizer.all_special_ids):
                return int(ids[0])
    return tokenizer.eos_token_id


def tokenize_example(raw: RawExample, tokenizer, max_length: int, end_id: int | None = -1) -> Example:
    """Chat-template the prompt, append the target and the end-of-turn token.

    Labels are -100 on the prompt and the target's token ids after it. The split is
    by position, never by token id: SmolLM2's pad id equals its end-of-turn id.
    Over-long examples lose prompt tokens from the left first, then target tokens.
    ``end_id`` is the end-of-turn id (:func:`end_of_turn_id`; -1: look it up, None: none).
    """
    end = end_of_turn_id(tokenizer) if end_id == -1 else end_id
    # Cut strings before tokenising: no kept token lies beyond max_length × CHARS_PER_TOKEN
    # characters, and a 10 MB line would otherwise be tokenised whole.
    span = max_length * CHARS_PER_TOKEN
    raw = RawExample(tuple((role, text[-span:]) for role, text in raw.prompt), raw.target[:span])
    messages = [{"role": role, "content": text} for role, text in raw.prompt]
    if messages and getattr(tokenizer, "chat_template", None):
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
            prompt_ids = prompt_ids["input_ids"]
    elif messages:
        prompt_ids = tokenizer("\n".join(text for _, text in raw.prompt) + "\n", add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = []
    target_ids = tokenizer(raw.target, add_special_tokens=False)["input_ids"]
    if end is not None:
        target_ids = target_ids + [end]
    target_ids = target_ids[: max(1, max_length - 1)]
    keep_prompt = max_length - len(target_ids)
    prompt_ids = list(prompt_ids)[-keep_prompt:] if keep_prompt > 0 else []
    if not prompt_ids and target_ids:  # causal LM needs one token of context for the first target
        prompt_ids, target_ids = target_ids[:1], target_ids[1:] if len(target_ids) > 1 else target_ids
    return Example(list(prompt_ids) + target_ids, [IGNORE] * len(prompt_ids) + target_ids)


# Tokenised examples shared by every FederatedData of one process that uses the same tokenizer files
# and settings (a study or a test session builds many runs over the same clients): tokenising is
# pure, so a cached Example equals a fresh one. Examples are never mutated after tokenisation.
_TOKENISED: dict[tuple, dict[RawExample, Example]] = {}


def tokenizer_key(tokenizer, max_length: int, end_id: int | None) -> tuple:
    """What a tokenisation depends on: the tokenizer's files (class, path, vocabulary, template, special ids) and the settings."""
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
            getattr(tokenizer, "chat_template", None), tuple(getattr(tokenizer, "all_special_ids", ())), max_length, end_id)


def tokenize_all(raws: list[RawExample], tokenizer, max_length: int, end_id: int | None) -> list[Example]:
    """:func:`tokenize_example` of each, through the process-wide cache."""
    cache = _TOKENISED.setdefault(tokenizer_key(tokenizer, max_length, end_id), {})
    out = []
    for raw in raws:
        example = cache.get(raw)
        if example is None:
            example = cache[raw] = tokenize_example(raw, tokenizer, max_length, end_id)
        out.append(example)
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded positions get label -100 and mask 0."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@dataclass
class FederatedData:
    """Per-client train examples and held-out examples (raw), pooled into global validation and test sets.

    ``validation``: held-out examples kept apart from ``test`` by the loader (chitchat: whole
    conversations on each side); None: the ``test`` pool is halved (rows with no shared
    context, e.g. a user file). ``split_version`` names how the split was made (provenance).
    Tokenisation happens on first use of a client, so building a federation of
    hundreds of clients costs string handling only.
    """

    name: str
    train: dict[str, list[RawExample]]
    test: dict[str, list[RawExample]]
    tokenizer: object
    max_length: int = 128
    eval_size: int = 256
    seed: int = 0
    validation: dict[str, list[RawExample]] | None = None
    split_version: str = "rows-v1"
    registered: tuple[str, ...] | None = None  # a device's view (:func:`device_view`): the whole federation's client ids
    _cache: dict[str, list[Example]] = field(default_factory=dict, repr=False)
    _evals: dict[tuple[str, int], list[Example]] = field(default_factory=dict, repr=False)
    end_id: int | None = field(default=None, init=False)
    duplicates_dropped: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.end_id = end_of_turn_id(self.tokenizer)
        empty = [c for c, rows in self.train.items() if not rows]
        if empty:
            raise ValueError(f"{self.name}: client(s) with no training examples: {empty[:3]}")
        if not self.train:
            raise ValueError(f"{self.name}: no clients")

    @property
    def client_ids(self) -> list[str]:
        return sorted(self.registered if self.registered is not None else self.train)

    def _own(self, client_id: str) -> None:
        if client_id not in self.train:
            held = f"only {', '.join(sorted(self.train))}'s data" if self.registered is not None else "no such client"
            raise ValueError(f"{self.name}: client {client_id!r}: this process holds {held}")

    def num_examples(self, client_id: str) -> int:
        self._own(client_id)
        return len(self.train[client_id])

    def train_examples(self, client_id: str) -> list[Example]:
        if client_id not in self._cache:
            self._own(client_id)
            self._cache[client_id] = tokenize_all(self.train[client_id], self.tokenizer, self.max_length, self.end_id)
        return self._cache[client_id]

    def heldout(self, split: str = "test") -> list[RawExample]:
        """One held-out split, every client's examples pooled and shuffled with the seed: ``validation``
        (for tuning) or ``test``. Without a separate validation set, the test pool's even positions
        form the validation split and its odd ones the test split."""
        if split not in ("test", "validation"):
            raise ValueError(f"split must be test or validation, got {split!r}")
        if self.validation is not None:
            source = self.validation if split == "validation" else self.test
            pool = [r for c in sorted(source) for r in source[c]]
            random.Random(f"heldout:{split}:{self.seed}").shuffle(pool)
            return pool
        pool = [r for c in sorted(self.test) for r in self.test[c]]
        random.Random(f"heldout:{self.seed}").shuffle(pool)
        return pool[1::2] if split == "test" else pool[0::2]

    def eval_examples(self, split: str = "test", size: int | None = None) -> list[Example]:
        """The first ``size`` (default ``eval_size``) examples of a held-out split, tokenised once."""
        size = self.eval_size if size is None else size
        if (split, size) not in self._evals:
            pool = self.heldout(split)
            if not pool:
                whose = " (a device's view holds none)" if self.registered is not None else ""
                raise ValueError(f"{self.name}: no held-out {split} examples{whose}")
            self._evals[(split, size)] = tokenize_all(pool[:size], self.tokenizer, self.max_length, self.end_id)
        return self._evals[(split, size)]


def device_view(load: Callable[[], FederatedData], keep: Callable[[list[str]], list[str]]) -> FederatedData:
    """A lean device's view of the federation ``load()`` gives (docs/algorithm.md §7.1): the training examples
    of the clients ``keep(client_ids)`` names and the federation's client ids; nothing of the others, no
    held-out data.

    The federation is loaded here, so this frame holds its only reference and frees it before the kept
    objects are made again (a pickle round trip): made during the parse, the kept examples and the 454
    chitchat client ids pinned ~150 MB of the interpreter's 1 MiB object arenas, each holding a few of them
    among freed examples (measured)."""
    data = load()
    ids = data.client_ids
    kept = keep(ids)
    unknown = sorted(set(kept) - set(data.train))
    if unknown:
        raise ValueError(f"{data.name}: no client {unknown[0]!r} among its {len(data.train)} clients")
    packed = pickle.dumps((tuple(ids), {c: data.train[c] for c in kept}))
    settings = {"name": data.name, "tokenizer": data.tokenizer, "max_length": data.max_length, "eval_size": data.eval_size,
                "seed": data.seed, "split_version": data.split_version}
    del data, ids, kept
    gc.collect()  # the parse holds reference cycles: without a collection it is still alive below
    registered, train = pickle.loads(packed)
    return FederatedData(train=train, test={}, validation={}, registered=registered, **settings)


def split_by_group(groups: dict[str, list], test_fraction: float, seed: int, salt: str) -> tuple[list, list]:
    """Split a client's groups (conversations, or single rows) into train/test, seeded per client."""
    keys = sorted(groups)
    rng = random.Random(f"{seed}:{salt}")
    rng.shuffle(keys)
    n_test = max(1, round(test_fraction * len(keys))) if len(keys) > 1 else 0
    test = [x for k in keys[:n_test] for x in groups[k]]
    train = [x for k in keys[n_test:] for x in groups[k]]
    return train, test
