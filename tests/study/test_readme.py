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


def bare_report(**changes):
    """A v4 report of a study that has only begun: two seeds of hetlora and fedavg-rmin, C7 lacking a tier perplexity."""
    report = {"version": 4, "plan": {"n": 20, "compute": {"sections": {"core": {"runs": 280}, "long": {"runs": 25}}}},
              "config": {"seeds": list(range(20)), "tuning": {"complete": True}}, "runs": [{}] * 4, "long_runs": [],
              "comparisons": [{"id": "C7", "label": "fedavg-rmin", "n": 1, "lacking_seeds": [1], "lacking": "hetlora's r = 5 tier perplexity",
                               "effect_pct": -3.0, "ci95_pct": None, "paper_effect_pct": None, "p_holm": 1.0, "verdict": "inconclusive"}],
              "sensitivity": [{"id": "C2", "label": "fedavg-rmax", "verdict": "inconclusive", "n": 2, "median_pct": 1.5,
                               "seeds_on_hetloras_side": 2, "seeds_on_other_side": 0, "wilcoxon_p": 0.5, "wilcoxon_p_holm": 1.0,
                               "wilcoxon_verdict": "reproduced", "leave_one_out_pct": None, "most_influential_seed": None,
                               "effect_without_it_pct": None, "verdict_flips_without": []}],
              "constraints": [{"need": "the thinnest uplink", "score": "upload per run (MB)", "by_final_ppl": False, "digits": 0,
                               "ranked": True, "ranking": [], "unscored": [{"label": "florist", "why": "no finished run yet"}],
                               "note": "no seed on which every allowed label finished yet", "n": 0, "best": None, "refused": []}]}
    return report | changes


def test_a_study_that_has_only_begun_renders_what_it_has_and_says_what_it_lacks():
    block = readme_block(bare_report(), "cpu-v4")
    assert "4 of 280 core runs and 0 of 25 long-regime runs finished; tuning complete." in block
    # C7's seed 1 lacks hetlora's tier perplexity: finished (2 of 20), and named
    assert "| C7 | fedavg-rmin | -3.00 (CI —…—) | — | 1 | 1.000 | inconclusive (interim, 2 of 20 seeds) (seed(s) 1 lack hetlora's r = 5 tier perplexity) |" in block
    # a two-seed row has no seed that moves it most: none is named
    assert "C2 (fedavg-rmax): the rank test reads it reproduced." in block and "None" not in block
    assert ("| the thinnest uplink; ranked by upload per run (MB) | no seed on which every allowed label finished yet; "
            "not ranked: florist (no finished run yet) | — | none |") in block
    assert "**The long regime** (more rounds): no run finished yet (0 of 25)." in block
    assert "ROUGE-L (the paper's second metric, secondary): no paired runs yet." in block and "Compute: no run yet." in block


def test_rouge_labels_without_an_interval_are_named_not_counted_as_including_zero():
    rows = [{"label": "fslora", "n": 4, "mean_points": 1.0, "ci95_points": [0.5, 1.5]},
            {"label": "florist", "n": 4, "mean_points": 0.1, "ci95_points": [-0.5, 0.7]},
            {"label": "rb-lora", "n": 1, "mean_points": 2.0, "ci95_points": None}]
    block = readme_block(bare_report(rouge_vs_hetlora=rows), "cpu-v4")
    assert ("fslora 1.00 (CI 0.50…1.50); every other label's interval includes 0 (no interval yet: rb-lora (n = 1)).") in block


def test_a_report_without_rows_or_sensitivity_says_so_rather_than_claiming_stability():
    block = readme_block(bare_report(comparisons=[], sensitivity=[]), "cpu-v4")
    assert "No comparison yet" in block and "Resting on single seeds: no row tested yet." in block
    older = bare_report()
    del older["sensitivity"]
    assert "not computed in this study.json" in readme_block(older, "cpu-v4")
    assert "(the plan states no totals)" in readme_block(bare_report(plan={"n": 20}), "cpu-v4")


def test_the_end_marker_is_looked_for_after_the_begin_marker(tmp_path):
    begin, end = markers("cpu-v4")
    readme = tmp_path / "README.md"
    readme.write_text(f"the block ends at a line `{end}`\n{begin} -->\nold\n{end}\ntail\n")
    update_readme(readme, "cpu-v4", f"{begin} -->\nnew\n{end}")
    assert readme.read_text() == f"the block ends at a line `{end}`\n{begin} -->\nnew\n{end}\ntail\n"
