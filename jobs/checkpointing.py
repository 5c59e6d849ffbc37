"""What a checkpoint holds and how it is written and read back.

Layout of one checkpoint directory (Ray Train merges what each rank writes):
  adapter/            peft adapter + tokenizer (rank 0): a plain `PeftModel.from_pretrained` directory
  optimizer.pt        optimizer + scheduler state (rank 0; identical on every DDP rank)
  rng_rank{R}.pt      each rank's RNG state, so dropout masks continue exactly
  trainer_state.json  step, loss history, eval history, final metrics (rank 0)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from jobs.distributed import rng_state, set_rng_state


@dataclass
class TrainerState:
    step: int = 0
    history: list[dict] = field(default_factory=list)  # one row per optimizer step
    evals: list[dict] = field(default_factory=list)
    resumed_at: list[int] = field(
        default_factory=list
    )  # the step of each resume (restart or re-run)
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    completed: bool = False
    final_metrics: dict = field(default_factory=dict)

    def record_eval(self, step: int, loss: float) -> bool:
        """Returns True when this eval improved on the best so far."""
        self.evals.append({"step": step, "eval_loss": loss})
        if self.best_eval_loss is None or loss < self.best_eval_loss:
            self.best_eval_loss, self.evals_without_improvement = loss, 0
            return True
        self.evals_without_improvement += 1
        return False


def save_checkpoint(
    directory: Path, model, tokenizer, optimizer, scheduler, state: TrainerState, rank: int
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), directory / f"rng_rank{rank}.pt")
    if rank != 0:
        return
    model.save_pretrained(directory / "adapter")
    tokenizer.save_pretrained(directory / "adapter")
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        directory / "optimizer.pt",
    )
    (directory / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))


def load_checkpoint(directory: Path, model, optimizer, scheduler, rank: int) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    state = TrainerState(**json.loads((directory / "trainer_state.json").read_text()))
    weights = load_file(directory / "adapter" / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {directory}: adapter has unexpected keys {result.unexpected_keys[:3]}"
        )
    opt = torch.load(directory / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def read_trainer_state(directory: Path) -> TrainerState:
    return TrainerState(**json.loads((Path(directory) / "trainer_state.json").read_text()))
