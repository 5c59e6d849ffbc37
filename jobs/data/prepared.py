"""PreparedData: what a job trains and evaluates on, whatever its objective."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PreparedData:
    # token ids per example (SFT input_ids/labels, DPO pairs, GRPO prompts): lists in memory, or
    # a job's StoredSplits (jobs/data/stored.py), which read their rows from storage
    train: Sequence[dict[str, Any]]
    eval: Sequence[dict[str, Any]]
    eval_conversations: Sequence[list[dict[str, str]]]  # for generated-answer metrics
    dataset_hash: str
    report: dict[str, Any]  # the manifest's counts, errors and where it lives
    train_samples: list[list[dict[str, str]]] = field(default_factory=list)  # few-shot examples

    def for_workers(self) -> dict[str, Sequence]:
        """What the objectives read ("train", "eval", "eval_conversations"); for a job, where on
        storage each split lies, not its rows."""
        return {
            "train": self.train,
            "eval": self.eval,
            "eval_conversations": self.eval_conversations,
        }
