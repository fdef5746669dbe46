"""The README's generated study block: written between its markers from study.json alone, and the committed README's
block is exactly what the committed study.json renders (so no figure there was copied by hand)."""

import json
import math
from pathlib import Path

import pytest

from hetlora.study.readme import load_report, markers, readme_block, update_readme

ROOT = Path(__file__).resolve().parents[2]
STUDY_JSON = ROOT / "benchmarks" / "results" / "cpu-v4" / "study.json"


def test_the_committed_readme_block_is_what_the_committed_study_json_renders():
    begin, end = markers("cpu-v4")
    text = (ROOT / "README.md").read_text()
    committed = text[text.index(begin):text.index(end) + len(end)]
    assert committed == readme_block(load_report(STUDY_JSON), "cpu-v4"), (
        "README.md's study block is stale: rebuild it from study.json with `make study-report`")


def test_the_block_replaces_only_the_text_between_the_markers_and_is_idempotent(tmp_path):
    begin, end = markers("cpu-v4")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{begin} -->\nold numbers\n{end}\nafter\n")
    update_readme(readme, "cpu-v4", f"{begin} new -->\nfresh\n{end}")
    once = readme.read_text()
    assert once == f"# title\n\nbefore\n{begin} new -->\nfresh\n{end}\nafter\n"
    update_readme(readme, "cpu-v4", f"{begin} new -->\nfresh\n{end}")
    assert readme.read_text() == once


def test_a_readme_without_the_markers_is_refused_naming_them(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# nothing to replace\n")
    with pytest.raises(ValueError, match="<!-- study:cpu-v4 begin"):
        update_readme(readme, "cpu-v4", "x")
    assert readme.read_text() == "# nothing to replace\n"


def test_strict_json_strings_read_back_as_numbers(tmp_path):
    f = tmp_path / "study.json"
    f.write_text(json.dumps({"runs": [{"label": "fed-plora", "final_eval_ppl": "inf"}], "x": ["nan", "-inf", "hetlora"]}))
    data = load_report(f)
    assert math.isinf(data["runs"][0]["final_eval_ppl"]) and math.isnan(data["x"][0]) and data["x"][1] == -math.inf
    assert data["x"][2] == "hetlora"


def test_a_v3_report_is_refused():
    with pytest.raises(ValueError, match="v4 report"):
        readme_block({"version": 3}, "cpu")
