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
