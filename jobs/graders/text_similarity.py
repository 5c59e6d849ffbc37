"""text_similarity: the similarity of the rendered input to the reference, in [0, 1]."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jinja2
import sacrebleu
from rapidfuzz import fuzz
from rouge_score import rouge_scorer

from jobs.graders.base import Grade, Grader, failed, short
from jobs.graders.config import TextSimilarityConfig
from jobs.graders.string_check import render_pair


def _rouge(kind: str) -> Callable[[str, str], float]:
    scorer = rouge_scorer.RougeScorer([kind])
    return lambda text, ref: scorer.score(target=ref, prediction=text)[kind].fmeasure


def metric(name: str) -> Callable[[str, str], float]:
    """(input, reference) -> similarity in [0, 1]."""
    if name == "fuzzy_match":
        return lambda text, ref: fuzz.ratio(text, ref) / 100
    if name == "bleu":
        return lambda text, ref: sacrebleu.sentence_bleu(text, [ref]).score / 100
    return _rouge("rougeL" if name == "rouge_l" else "rouge" + name.removeprefix("rouge_"))


class TextSimilarityGrader(Grader):
    config: TextSimilarityConfig

    def __init__(self, config: TextSimilarityConfig):
        super().__init__(config)
        self._metric = metric(config.evaluation_metric)

    def grade(self, samples: list[dict[str, Any]]) -> list[Grade]:
        return [self._one(s) for s in samples]

    def _one(self, sample: dict[str, Any]) -> Grade:
        try:
            text, ref = render_pair(self.config, sample)
        except jinja2.TemplateError as e:
            return failed(self.name, short(str(e)))
        score = min(1.0, max(0.0, float(self._metric(text, ref))))
        threshold = self.config.pass_threshold
        passed = None if threshold is None else score >= threshold
        return Grade(score, scores={self.name: score}, passed=passed)
