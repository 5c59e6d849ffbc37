"""Reward graders in OpenAI's reinforcement-fine-tuning shapes: string_check, text_similarity,
python, score_model and multi.

    grader = make_grader(cfg)            # cfg: a GraderConfig (validated when the job config loads)
    grades = grader.grade(samples)       # samples: [{"output_text": str, "item": dict}, ...]
    metrics = summarize(grades)          # reward/mean, reward/std, reward/<name>/mean, grader_errors
    grader.close()                       # or `with make_grader(cfg) as grader:`

A sample that cannot be graded scores 0 with Grade.error set; grade() does not raise for it.
"""

from jobs.graders.base import Grade, Grader, summarize
from jobs.graders.build import make_grader
from jobs.graders.config import (
    GraderConfig,
    MultiConfig,
    PythonConfig,
    ScoreModelConfig,
    StringCheckConfig,
    TextSimilarityConfig,
)

__all__ = [
    "Grade",
    "Grader",
    "GraderConfig",
    "MultiConfig",
    "PythonConfig",
    "ScoreModelConfig",
    "StringCheckConfig",
    "TextSimilarityConfig",
    "make_grader",
    "summarize",
]
