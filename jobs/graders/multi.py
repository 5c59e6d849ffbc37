"""multi: named sub-graders combined by a formula (calculate_output) over their scores."""

from __future__ import annotations

from typing import Any

from jobs.graders.base import Grade, Grader, short
from jobs.graders.config import MultiConfig
from jobs.graders.formula import evaluate


class MultiGrader(Grader):
    config: MultiConfig

    def __init__(self, config: MultiConfig, graders: dict[str, Grader]):
        """`graders`: one built grader per key of config.graders (make_grader builds them)."""
        super().__init__(config)
        self.graders = graders

    def __reduce__(self):
        # the sub-graders pickle as their configs
        return (type(self), (self.config, self.graders))

    def grade(self, samples: list[dict[str, Any]]) -> list[Grade]:
        # Each sub-grader sees the whole batch (a python child or a model endpoint is used once per batch).
        by_grader = {key: grader.grade(samples) for key, grader in self.graders.items()}
        return [
            self._combine({k: grades[i] for k, grades in by_grader.items()})
            for i in range(len(samples))
        ]

    def _combine(self, grades: dict[str, Grade]) -> Grade:
        scores = {key: g.score for key, g in grades.items()}  # a failed sub-grade counts as 0
        errors = [f"{key}: {g.error}" for key, g in grades.items() if g.error is not None]
        try:
            score = evaluate(self.config.calculate_output, scores)
        except Exception as e:  # simpleeval raises many kinds; a bad sample must not stop the batch
            return Grade(
                0.0,
                error=short("; ".join([*errors, f"calculate_output: {short(e)}"])),
                scores=scores,
            )
        return Grade(score, error=short("; ".join(errors)) if errors else None, scores=scores)

    def close(self) -> None:
        for grader in self.graders.values():
            grader.close()
