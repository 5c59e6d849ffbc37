"""string_check: 1.0 when the rendered input and reference compare as the operation says, else 0.0."""

from __future__ import annotations

from typing import Any

import jinja2

from jobs.graders.base import Grade, Grader, failed, short
from jobs.graders.config import StringCheckConfig
from jobs.graders.templates import render

OPERATIONS = {
    "eq": lambda text, ref: text == ref,
    "ne": lambda text, ref: text != ref,
    "like": lambda text, ref: ref in text,
    "ilike": lambda text, ref: ref.casefold() in text.casefold(),
}


def render_pair(config: Any, sample: dict[str, Any]) -> tuple[str, str]:
    """The sample's (input, reference); a jinja2.TemplateError names which template failed."""
    out = []
    for field in ("input", "reference"):
        try:
            out.append(render(getattr(config, field), sample))
        except jinja2.TemplateError as e:
            raise jinja2.TemplateError(f"{field}: {e}") from None
    return out[0], out[1]


class StringCheckGrader(Grader):
    config: StringCheckConfig

    def grade(self, samples: list[dict[str, Any]]) -> list[Grade]:
        return [self._one(s) for s in samples]

    def _one(self, sample: dict[str, Any]) -> Grade:
        try:
            text, ref = render_pair(self.config, sample)
        except jinja2.TemplateError as e:
            return failed(self.name, short(str(e)))
        score = float(OPERATIONS[self.config.operation](text, ref))
        return Grade(score, scores={self.name: score})
