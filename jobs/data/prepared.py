"""PreparedData: what a job trains and evaluates on, whatever its objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]  # token ids per example: SFT input_ids/labels, DPO pairs
    eval: list[dict[str, list[int]]]
    eval_conversations: list[list[dict[str, str]]]  # for generated-answer metrics
    dataset_hash: str
    report: dict[str, Any]  # the manifest's counts, errors and where it lives
    train_samples: list[list[dict[str, str]]] = field(default_factory=list)  # few-shot examples
