"""Training objectives: what a batch is, the step's loss, the held-out metrics, the final table.

The recipe (jobs/finetune.py) never branches on `train.method`; it asks the objective:

    obj = make_objective(cfg, rt, tokenizer, data)
    obj.batch(examples)                     # a micro-batch's tensors
    obj.train_step(par, micro_batches)      # forward, backward, optimizer step -> StepResult
    obj.evaluate(par, full)                 # held-out metrics ("eval_loss" always)
    obj.base_metrics(par, state)            # the base model's, for the final comparison
    type(obj).print_summary(summary)        # the driver's final table
    obj.start(...) / obj.close()            # around the loop: what it runs (GRPO's actors)

A new objective is a new module here and one line in OBJECTIVES.
"""

from __future__ import annotations

from inference.runtime import Runtime
from jobs.config import JobConfig
from jobs.objectives.base import Objective, StepResult
from jobs.objectives.dpo import DPO
from jobs.objectives.grpo import GRPO
from jobs.objectives.sft import SFT

OBJECTIVES: dict[str, type[Objective]] = {"sft": SFT, "dpo": DPO, "grpo": GRPO}

__all__ = ["OBJECTIVES", "Objective", "StepResult", "make_objective", "objective_class"]


def objective_class(cfg: JobConfig) -> type[Objective]:
    return OBJECTIVES[cfg.train.method]


def make_objective(cfg: JobConfig, rt: Runtime, tokenizer, data: dict) -> Objective:
    return objective_class(cfg)(cfg, rt, tokenizer, data)
