import json

import pytest

from hetlora.data import load_data


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_prompt_response_and_text(tmp_path, tiny):
    _, tok = tiny
    rows = [{"client_id": "a", "prompt": f"q{i}", "response": f"answer {i}"} for i in range(5)]
    rows += [{"client_id": "b", "text": f"plain text number {i}"} for i in range(4)]
    d = load_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), tok, seed=0)
    assert d.client_ids == ["a", "b"]
    assert d.num_examples("a") + len(d.test["a"]) == 5 and len(d.test["a"]) == 1
    ex = d.train_examples("b")[0]
    assert "plain text number" in tok.decode([t for t in ex.input_ids]) and ex.labels[1:] == ex.input_ids[1:]


def test_csv(tmp_path, tiny):
    _, tok = tiny
    p = tmp_path / "d.csv"
    p.write_text("client_id,prompt,response\nx,hi,hello\nx,how,fine\ny,a,b\ny,c,d\n")
    d = load_data(str(p), tok)
    assert d.client_ids == ["x", "y"]


@pytest.mark.parametrize(
    "content,suffix,message",
    [
        ('{"client_id": "a", "text": "ok"}\n{bad json}\n', ".jsonl", r"d.jsonl:2: bad JSON"),
        ('{"client_id": "a", "prompt": "p"}\n', ".jsonl", r"d.jsonl:1: needs prompt and response"),
        ('{"text": "t"}\n', ".jsonl", r"d.jsonl:1: missing client_id"),
        ("id,text\n1,x\n", ".csv", r"d.csv:1: header needs client_id"),
        ("client_id,text\na,\n", ".csv", r"d.csv:2: empty text"),
        ("", ".jsonl", "no examples"),
        ("x", ".parquet", "unsupported format"),
    ],
)
def test_malformed_files_name_file_line_and_problem(tmp_path, tiny, content, suffix, message):
    _, tok = tiny
    p = tmp_path / f"d{suffix}"
    p.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_data(str(p), tok)


def test_unreadable_file(tmp_path, tiny):
    _, tok = tiny
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="unreadable"):
        load_data(str(p), tok)


def test_iid_and_dirichlet_partitioning(tmp_path, tiny):
    _, tok = tiny
    rows = [{"text": f"sample {i}", "label": i % 3} for i in range(60)]
    p = write_jsonl(tmp_path / "nolabels.jsonl", rows)
    iid = load_data(str(p), tok, partition={"scheme": "iid", "num_clients": 4, "seed": 0})
    assert len(iid.client_ids) == 4
    assert sum(iid.num_examples(c) + len(iid.test[c]) for c in iid.client_ids) == 60
    sizes = [iid.num_examples(c) + len(iid.test[c]) for c in iid.client_ids]
    assert sizes == [15, 15, 15, 15]
    skew = load_data(str(p), tok, partition={"scheme": "dirichlet", "num_clients": 4, "seed": 0, "alpha": 0.1})
    assert sum(skew.num_examples(c) + len(skew.test[c]) for c in skew.client_ids) == 60
    bad = write_jsonl(tmp_path / "nolabel.jsonl", [{"text": "x"}] * 5)
    with pytest.raises(ValueError, match="needs a 'label' column"):
        load_data(str(bad), tok, partition={"scheme": "dirichlet", "num_clients": 2, "seed": 0})


def test_csv_with_a_byte_order_mark_and_quoted_multiline_fields(tmp_path, tiny):
    _, tok = tiny
    p = tmp_path / "d.csv"
    p.write_bytes("\ufeffclient_id,prompt,response\n".encode() + b'a,hi,"multi\nline\nresponse"\na,q,r\nb,x,y\nb,z,w\n')
    d = load_data(str(p), tok, seed=0)
    responses = sorted(r.target for c in d.client_ids for r in d.train[c] + d.test[c])
    assert "multi\nline\nresponse" in responses and d.client_ids == ["a", "b"]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b'client_id,prompt,response\na,"one\ntwo",ok\nb,x,y\nc,"unterminated\n')
    with pytest.raises(ValueError, match=r"bad.csv:5: needs prompt and response"):
        load_data(str(bad), tok)


def test_non_utf8_is_reported_by_line(tmp_path, tiny):
    _, tok = tiny
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"client_id": "a", "text": "ok"}\n{"client_id": "a", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not UTF-8 \(byte 0xe9\)"):
        load_data(str(p), tok)


@pytest.mark.parametrize(
    "row,message",
    [
        ({"client_id": 1.0, "text": "t"}, "client_id must be a string or an integer, got float"),
        ({"client_id": True, "text": "t"}, "client_id must be a string or an integer, got bool"),
        ({"client_id": {"a": 1}, "text": "t"}, "client_id must be a string or an integer, got dict"),
        ({"client_id": "a", "prompt": ["x"], "response": "r"}, "prompt must be a string, got list"),
        ({"client_id": "a", "text": {"t": 1}}, "text must be a string, got dict"),
    ],
)
def test_client_ids_and_text_are_typed(tmp_path, tiny, row, message):
    _, tok = tiny
    with pytest.raises(ValueError, match=f"d.jsonl:1: {message}"):
        load_data(str(write_jsonl(tmp_path / "d.jsonl", [row])), tok)


def test_integer_and_string_ids_are_one_client(tmp_path, tiny):
    _, tok = tiny
    rows = [{"client_id": 1, "text": f"a {i}"} for i in range(3)] + [{"client_id": "1", "text": f"b {i}"} for i in range(3)]
    d = load_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), tok)
    assert d.client_ids == ["1"] and d.num_examples("1") + len(d.test["1"]) == 6


def test_duplicates_are_dropped_and_counted(tmp_path, tiny):
    _, tok = tiny
    rows = [{"client_id": "a", "text": f"t {i % 4}"} for i in range(10)]  # 4 distinct, 6 copies
    d = load_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), tok)
    assert d.duplicates_dropped == 6
    train, test = {r.target for r in d.train["a"]}, {r.target for r in d.test["a"]}
    assert len(d.train["a"]) + len(d.test["a"]) == 4 and not train & test


def test_min_examples_applies_to_files(tmp_path, tiny):
    _, tok = tiny
    rows = [{"client_id": "big", "text": f"t {i}"} for i in range(10)] + [{"client_id": "small", "text": f"s {i}"} for i in range(3)]
    d = load_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), tok, min_examples=5)
    assert d.client_ids == ["big"]
    with pytest.raises(ValueError, match="no client has 50 training"):
        load_data(str(tmp_path / "d.jsonl"), tok, min_examples=50)


def test_a_huge_line_is_cut_before_it_is_tokenised(tmp_path, tiny, monkeypatch):
    from hetlora.data.federated import CHARS_PER_TOKEN, RawExample, tokenize_example

    _, tok = tiny
    seen = []  # the longest text that reaches the tokenizer on each call
    real_call, real_template = type(tok).__call__, type(tok).apply_chat_template
    monkeypatch.setattr(type(tok), "__call__", lambda self, text, **kw: seen.append(len(text)) or real_call(self, text, **kw))
    monkeypatch.setattr(type(tok), "apply_chat_template", lambda self, messages, **kw: seen.append(
        max(len(m["content"]) for m in messages)) or real_template(self, messages, **kw))
    huge = RawExample((("user", "word " * 2_000_000),), "answer " * 2_000_000)  # 10 MB each
    e = tokenize_example(huge, tok, max_length=64)
    assert len(e.input_ids) == 64 and seen and max(seen) <= 2 * 64 * CHARS_PER_TOKEN, seen  # chars, not 10 MB (template text aside)
    small = RawExample((("user", "word " * 300),), "answer " * 300)
    assert tokenize_example(small, tok, max_length=64) == e  # cutting changed nothing that is kept


def test_a_device_keeps_only_its_own_rows_of_a_user_file(tiny, tmp_path):
    import json

    from hetlora.data import load_data

    _, tok = tiny
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"client_id": f"c{i % 3}", "prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(30)))
    whole = load_data(str(path), tok, max_length=32)
    device = load_data(str(path), tok, keep=lambda ids: ids[2:], max_length=32)
    assert device.client_ids == whole.client_ids == ["c0", "c1", "c2"]
    assert device.train == {"c2": whole.train["c2"]}
