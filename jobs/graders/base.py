"""What every grader promises: a score per sample, errors counted rather than raised."""

from __future__ import annotations

import math
import statistics
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # The same settings as jobs.config.Section; not imported from there because jobs/config.py
    # imports GraderConfig from this package (a cycle).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass
class Grade:
    """One sample's reward; a grading error is a score of 0 with the reason in `error`."""

    score: float
    error: str | None = None
    scores: dict[str, float] = field(
        default_factory=dict
    )  # per sub-grader (multi), else {name: score}
    passed: bool | None = None  # text_similarity with pass_threshold; metadata only


def failed(name: str, error: str) -> Grade:
    return Grade(0.0, error=error, scores={name: 0.0})


def short(error: BaseException | str, limit: int = 300) -> str:
    """An exception as one short line for a Grade (the full trace would flood the logs)."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Grader(ABC):
    """Built from its config where it is used; pickles as its config (Ray ships it that way), so
    subprocesses and HTTP clients are never pickled."""

    def __init__(self, config: Any):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @abstractmethod
    def grade(self, samples: list[dict[str, Any]]) -> list[Grade]:
        """One Grade per sample ({"output_text": str, "item": dict}), in order; never raises for
        a bad sample."""

    def close(self) -> None:  # noqa: B027 (most graders hold nothing to release)
        """Release subprocesses and clients; the grader can still grade afterwards (it restarts them)."""

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self):
        # every grader is built from its config alone (jobs.graders.build.make_grader)
        return (type(self), (self.config,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, type={self.config.type!r})"


def summarize(grades: list[Grade]) -> dict[str, float]:
    """Metrics for a batch: reward/mean, reward/std, reward/<name>/mean per sub-grader, grader_errors."""
    if not grades:
        return {"grader_errors": 0.0}
    scores = [g.score for g in grades]
    out = {"reward/mean": statistics.fmean(scores), "reward/std": statistics.pstdev(scores)}
    for name in dict.fromkeys(k for g in grades for k in g.scores):
        values = [g.scores[name] for g in grades if name in g.scores]
        out[f"reward/{name}/mean"] = statistics.fmean(values)
    passed = [g.passed for g in grades if g.passed is not None]
    if passed:
        out["reward/pass_rate"] = sum(passed) / len(passed)
    out["grader_errors"] = float(sum(g.error is not None for g in grades))
    return out


def finite(value: Any) -> float:
    """A real, finite number as float, else ValueError (bools are not scores)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    return value
