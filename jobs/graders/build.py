"""make_grader: the grader for a config, built where it is used."""

from __future__ import annotations

from jobs.graders.base import Grader
from jobs.graders.config import (
    MultiConfig,
    PythonConfig,
    ScoreModelConfig,
    StringCheckConfig,
    TextSimilarityConfig,
)


def make_grader(
    config: StringCheckConfig
    | TextSimilarityConfig
    | PythonConfig
    | ScoreModelConfig
    | MultiConfig,
) -> Grader:
    from jobs.graders.multi import MultiGrader
    from jobs.graders.python_grader import PythonGrader
    from jobs.graders.score_model import ScoreModelGrader
    from jobs.graders.string_check import StringCheckGrader
    from jobs.graders.text_similarity import TextSimilarityGrader

    graders = {
        "string_check": StringCheckGrader,
        "text_similarity": TextSimilarityGrader,
        "python": PythonGrader,
        "score_model": ScoreModelGrader,
    }
    if config.type == "multi":
        return MultiGrader(config, {key: make_grader(sub) for key, sub in config.graders.items()})
    return graders[config.type](config)
