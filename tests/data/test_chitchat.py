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
        assert d.test[c], "every client keeps held-out conversations"
        assert len(train_targets) > 0
    assert len(d.eval_examples()) == 12
    first = d.client_ids[0]
    ex = d.train_examples(first)
    assert len(ex) == d.num_examples(first) and all(len(e.input_ids) <= 48 for e in ex)
