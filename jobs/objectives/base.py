"""The Objective interface the recipe trains through (see jobs/objectives/__init__.py)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inference.runtime import Runtime
from jobs.checkpointing import TrainerState
from jobs.config import JobConfig


@dataclass
class StepResult:
    loss: float  # the step's mean loss over every rank
    tokens: int  # non-padding input tokens over every rank
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's own, e.g. margin


class Objective(ABC):
    """One training objective. `data` holds the prepared set: "train" and "eval" (token ids),
    "eval_conversations" (held-out chats for generated-answer metrics), each an indexable
    sequence; in a job, StoredSplits that read the rows asked for from storage (jobs/data/stored.py)."""

    # metric names as the tracker shows them, where the field has a convention (TRL's)
    tracked_names: dict[str, str] = {}
    # step metrics shown on the progress line besides the loss, and held-out ones on eval lines
    shown_on_progress: tuple[str, ...] = ()
    shown_on_eval: tuple[str, ...] = ()

    def __init__(self, cfg: JobConfig, rt: Runtime, tokenizer, data: dict):
        self.cfg, self.rt, self.tokenizer = cfg, rt, tokenizer
        self.train_examples, self.eval_examples = data["train"], data["eval"]
        self.eval_conversations = data["eval_conversations"]
        self.pad_id = tokenizer.pad_token_id

    def start(self, par, state: TrainerState, upcoming, total_steps: int) -> None:
        """Before the loop, after a resume: what the objective needs running (GRPO's rollout
        actors). `upcoming(step)` gives that step's micro-batches (looking ahead)."""
        return None

    def close(self) -> None:
        """After the loop, on every way out: what start() started is stopped."""
        return None

    def evaluates_before_training(self) -> bool:
        """Whether the base's metrics come from an evaluation before the first step: a full
        fine-tune keeps no base to compare with."""
        return self.cfg.lora is None

    @abstractmethod
    def batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """A micro-batch's tensors."""

    @abstractmethod
    def train_step(self, par, micro_batches: list[dict]) -> StepResult:
        """One optimizer step over this rank's micro-batches (gradient accumulation)."""

    @abstractmethod
    def evaluate(self, par, full: bool) -> dict[str, float]:
        """Held-out metrics of the model as it is now, with "eval_loss" among them; `full` adds
        the costlier ones (generation) that the final table and the pre-training baseline show."""

    def base_metrics(self, par, state: TrainerState) -> dict[str, float]:
        """The base model's held-out metrics for the final comparison: LoRA switched off, or (a
        full fine-tune) the evaluation made before the first step."""
        if self.cfg.lora is None:
            return state.base_metrics
        with par.adapter_disabled():
            return self.evaluate(par, full=True)

    def tracked(self, prefix: str, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics under the tracker's names: prefix/name, with the field's conventional names."""
        return {f"{prefix}/{self.tracked_names.get(k, k)}": v for k, v in metrics.items()}

    @staticmethod
    def write_artifacts(summary: dict, directory: Path) -> None:
        """Files of the objective's own in the run directory (summary: run.json's fields)."""
        return None

    @staticmethod
    @abstractmethod
    def print_summary(summary: dict) -> None:
        """The driver's closing lines for a finished run (summary: what run_job returns)."""
