"""metrics.jsonl: appended row by row, read back with the line of any bad row, cut back to a round on resume."""

import json

import pytest

from hetlora.server.outputs import append_metrics, read_metrics, truncate_metrics


def test_rows_round_trip_and_a_missing_file_is_no_rows(tmp_path):
    assert read_metrics(tmp_path) == []
    for r in (1, 2):
        append_metrics(tmp_path, {"round": r, "eval_ppl": 10.0 / r, "ranks": {"a": r}})
    assert read_metrics(tmp_path) == [{"eval_ppl": 10.0, "ranks": {"a": 1}, "round": 1}, {"eval_ppl": 5.0, "ranks": {"a": 2}, "round": 2}]


def test_a_bad_row_is_named_by_its_line(tmp_path):
    append_metrics(tmp_path, {"round": 1})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 2, "eval_')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics(tmp_path)


def test_truncate_keeps_rounds_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    for r in (1, 2, 3):
        append_metrics(tmp_path, {"round": r})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 4, "ev')  # the crash tore round 4's row
    truncate_metrics(tmp_path, 2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
