import pytest

from hetlora.data.chitchat import conversation_examples
from hetlora.data.federated import IGNORE, RawExample, collate, tokenize_example


def msg(sender, *texts):
    return [{"text": t, "sender": sender} for t in texts]


def test_conversation_examples_roles_and_context():
    conv = [msg("a", "hi", "there"), msg("b", "hello"), msg("a", "how are you"), msg("b", "good"), msg("a", "nice")]
    ex = conversation_examples(conv, context=3)
    assert [s for s, _ in ex] == ["b", "a", "b", "a"]
    sender, last = ex[-1]
    assert last.target == "nice"
    # previous three turns; the target sender's own turns are "assistant"
    assert last.prompt == (("user", "hello"), ("assistant", "how are you"), ("user", "good"))
    assert ex[0][1] == RawExample((("user", "hi there"),), "hello")


def test_labels_cover_only_target_tokens(tiny):
    _, tok = tiny
    e = tokenize_example(RawExample((("user", "how are you"),), "fine thanks"), tok, max_length=64)
    target = [t for t in e.labels if t != IGNORE]
    assert tok.decode(target) == "fine thanks<|im_end|>"
    n_prompt = e.labels.index(target[0])
    assert all(x == IGNORE for x in e.labels[:n_prompt]) and e.input_ids[n_prompt:] == target
    # the end-of-turn id equals the pad id, yet the prompt's own <|im_end|> tokens stay masked
    assert tok.pad_token_id in e.input_ids[:n_prompt]


def test_truncation_keeps_the_target(tiny):
    _, tok = tiny
    e = tokenize_example(RawExample((("user", "word " * 200),), "short answer"), tok, max_length=32)
    assert len(e.input_ids) == 32
    assert tok.decode([t for t in e.labels if t != IGNORE]) == "short answer<|im_end|>"


def test_collate_masks_padding_by_position(tiny):
    _, tok = tiny
    a = tokenize_example(RawExample((("user", "a"),), "b"), tok, 64)
    b = tokenize_example(RawExample((("user", "a longer prompt here"),), "and a longer target"), tok, 64)
    batch = collate([a, b], tok.pad_token_id)
    n = len(a.input_ids)
    assert batch["attention_mask"][0, n:].sum() == 0 and batch["attention_mask"][0, :n].all()
    assert (batch["labels"][0, n:] == IGNORE).all()
    assert batch["input_ids"].shape[1] == len(b.input_ids)


def test_chitchat_clients_split_by_conversation(chitchat_small):
    d = chitchat_small
    assert 2 <= len(d.client_ids) <= 60
    for c in d.client_ids:
        assert d.num_examples(c) >= 400
        train_targets = {r.target for r in d.train[c]}
        assert len(train_targets) > 0
    assert len(d.eval_examples()) == 12
    first = d.client_ids[0]
    ex = d.train_examples(first)
    assert len(ex) == d.num_examples(first) and all(len(e.input_ids) <= 48 for e in ex)


def test_no_conversation_is_on_two_sides_of_the_split(tiny):
    """Every conversation lies wholly in train, validation or test, for both its senders: rebuilt from the raw
    data, no conversation gives examples to two sides (split version 1 put the other side of 64 % of held-out
    conversations into some client's training data)."""
    from hetlora.data import load_data
    from hetlora.data.chitchat import SPLIT_VERSION, chitchat_path, examples_by_sender

    _, tok = tiny
    d = load_data("chitchat", tok, min_examples=20, max_length=48, eval_size=8, seed=0)
    where: dict[RawExample, set[str]] = {}
    for convs in examples_by_sender(str(chitchat_path()), 3).values():
        for conv_id, examples in convs.items():
            for e in examples:
                where.setdefault(e, set()).add(conv_id)
    sides = {"train": d.train, "validation": d.validation, "test": d.test}
    conversations = {side: {c for per_client in split.values() for e in per_client for c in where[e] if len(where[e]) == 1}
                     for side, split in sides.items()}
    assert all(conversations.values())
    assert not conversations["train"] & conversations["validation"]
    assert not conversations["train"] & conversations["test"]
    assert not conversations["validation"] & conversations["test"]
    # and the pooled held-out splits share no example with each other or with training, except the few
    # exchanges that occur word for word in several conversations (greetings such as "Hi!" → "Hello!")
    unique = {e for e, convs in where.items() if len(convs) == 1}
    train = {e for per_client in d.train.values() for e in per_client} & unique
    val, test = set(d.heldout("validation")) & unique, set(d.heldout("test")) & unique
    assert not val & test and not (val | test) & train
    assert sum(1 for e in where if len(where[e]) > 1) < 100 < len(val)
    assert d.split_version == SPLIT_VERSION == "conversation-v2"


def test_a_device_keeps_only_its_own_clients_data_and_the_federations_ids(tiny, chitchat_small):
    """``keep`` (a lean device, --release-memory on a SuperNode): the same client ids in the same order, this
    client's examples exactly as the whole federation's load gives them, nothing of any other client or of
    the held-out splits, and the parse is not cached for the next call."""
    from hetlora.data import load_data
    from hetlora.data.chitchat import examples_by_sender
    from hetlora.data.federated import device_view

    _, tok = tiny
    whole = chitchat_small
    mine = whole.client_ids[1]
    examples_by_sender.cache_clear()
    device = load_data("chitchat", tok, keep=lambda ids: [ids[1]], min_examples=400, max_length=48, eval_size=12, seed=0)
    assert examples_by_sender.cache_info().currsize == 0  # the federation's parse is freed, not kept
    assert device.client_ids == whole.client_ids
    assert device.num_examples(mine) == whole.num_examples(mine)
    assert [e.input_ids for e in device.train_examples(mine)] == [e.input_ids for e in whole.train_examples(mine)]
    assert list(device.train) == [mine] and not device.test and not device.validation
    other = whole.client_ids[0]
    with pytest.raises(ValueError, match=f"client '{other}': this process holds only {mine}'s data"):
        device.num_examples(other)
    with pytest.raises(ValueError, match="no held-out test examples .a device's view holds none"):
        device.eval_examples()
    with pytest.raises(ValueError, match="no client 'nobody'"):
        device_view(lambda: whole, lambda ids: ["nobody"])


def test_a_fixed_split_seed_keeps_tuning_validation_out_of_every_seeds_test_split(tiny):
    """Study v4 (issue #44): with ``split_seed`` fixed, runs of any seed hold the same train / validation / test
    conversations and draw the same held-out examples, so what tuning validates on is in no seed's test split.
    Without it the split is redrawn per seed, and a tuning run's validation examples are in other seeds' test."""
    from hetlora.config import RunConfig
    from hetlora.data import load_data

    _, tok = tiny

    def data(seed, split_seed):
        return load_data("chitchat", tok, **(RunConfig(seed=seed, split_seed=split_seed, min_examples=20, max_length=48,
                                                       eval_size=8).data_options()))

    tuning = data(0, 7)
    validation = set(tuning.heldout("validation"))
    # the only examples validation shares with test are exchanges word for word in several conversations ("Hi!")
    within = validation & set(tuning.heldout("test"))
    assert len(within) < 20
    for seed in (1, 2):
        run = data(seed, 7)
        assert validation & set(run.heldout("test")) == within
        assert run.test == tuning.test and run.train == tuning.train
        assert run.heldout("test") == tuning.heldout("test")  # the same examples in the same draw order
    assert RunConfig(seed=3).data_seed == 3 and RunConfig(seed=3, split_seed=7).data_seed == 7
    # the default (v3's design) redraws the split per seed: ~10 % of the tuning validation is in seed 1's test
    assert len(validation & set(data(1, None).heldout("test"))) > 0.05 * len(validation)
