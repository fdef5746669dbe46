"""ROUGE-L against hand-computed longest common subsequences, and in a run: the final model's responses scored once."""

import pytest

from hetlora.server.rouge import rouge_l


def test_rouge_l_by_hand():
    # LCS("the cat is on the mat", "the cat sat on the mat") = "the cat on the mat": 5 of 6 tokens each way: F = 5/6
    assert rouge_l(["the cat is on the mat"], ["the cat sat on the mat"]) == pytest.approx(5 / 6)
    # "a b c d" vs "d c b a": LCS 1 → P = R = 1/4; identical (case and punctuation aside): 1; mean of the two: 5/8
    assert rouge_l(["a b c d", "Hello, World"], ["d c b a", "hello world"]) == pytest.approx((1 / 4 + 1) / 2)
    assert rouge_l(["something"], [""]) == 0.0


def test_rouge_l_refuses_mismatched_or_empty_lists():
    with pytest.raises(ValueError, match="2 references but 1 responses"):
        rouge_l(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no responses"):
        rouge_l([], [])


def test_a_run_scores_its_final_models_responses_once_and_the_same_seed_scores_the_same(tmp_path):
    from hetlora.server.runner import run
    from tests.server.test_runner import rows, tiny_config

    summaries = [run(tiny_config(tmp_path / name, rounds=2, local_steps=1, eval_size=4, rouge_size=3, rouge_max_tokens=5), progress=False)
                 for name in ("a", "b")]
    first, last = rows(tmp_path / "a")
    assert "rouge_l" not in first and 0.0 <= last["rouge_l"] <= 1.0 and last["rouge_size"] == 3
    assert summaries[0]["final_rouge_l"] == summaries[1]["final_rouge_l"] == last["rouge_l"]


def test_a_server_without_rouge_score_refuses_rouge_size_before_anything_loads(monkeypatch):
    """A device install lacks the server extra: a server started there with --rouge-size says so at once, instead of
    failing after its last round."""
    import importlib.util

    from hetlora.config import RunConfig
    from hetlora.server.federation import Federation

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rouge_score" else found(name, *a))
    with pytest.raises(ValueError, match=r"rouge_size needs the rouge-score package of the server extra"):
        Federation(RunConfig(model="tiny", rouge_size=4), host=object())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dp_accounting" else found(name, *a))
    with pytest.raises(ValueError, match=r"dp_clip needs the dp-accounting package of the server extra"):
        Federation(RunConfig(model="tiny", dp_clip=1.0), host=object())
