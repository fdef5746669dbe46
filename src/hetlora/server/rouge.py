"""ROUGE-L of responses against references: the HetLoRA paper's second metric (docs/algorithm.md §10).

The score is Google's ``rouge-score`` (the reference ROUGE-1.5.5 reimplementation that Hugging Face ``evaluate``
wraps), ROUGE-L F-measure with its default tokenizer (lowercased, split on non-alphanumerics) and no stemming, averaged
over the examples. A server-side dependency (the ``server`` extra); a device never imports it.
"""

from __future__ import annotations

from typing import Sequence


def rouge_l(references: Sequence[str], responses: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure of ``responses[i]`` against ``references[i]``."""
    if len(references) != len(responses):
        raise ValueError(f"{len(references)} references but {len(responses)} responses")
    if not references:
        raise ValueError("no responses to score")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return sum(scorer.score(ref, resp)["rougeL"].fmeasure for ref, resp in zip(references, responses)) / len(references)
