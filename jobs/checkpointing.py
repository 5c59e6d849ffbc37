"""What a checkpoint holds and how it is written and read back.

Layout of one checkpoint directory (Ray Train merges what each rank writes into it):
  adapter/            LoRA: the whole adapter, gathered on rank 0, + tokenizer; a plain
                      `PeftModel.from_pretrained` directory whatever the strategy
  model/              full fine-tune, final checkpoint only: a consolidated HF model + tokenizer
  ddp_state.pt        ddp: trainable weights, optimizer, scheduler (rank 0)
  fsdp/               fsdp: torch.distributed.checkpoint shards of trainable weights + optimizer
  scheduler.pt          (one file per rank, .metadata from rank 0) and the scheduler
  deepspeed/state/    deepspeed: the engine's own checkpoint (ZeRO partitions per rank)
  rng_rank{R}.pt      each rank's RNG state, so dropout masks continue exactly
  trainer_state.json  step, loss history, eval history, final metrics (rank 0)
  COMMIT_rank{R}_of{W}.json
                      each rank's commit marker: the files it wrote and their sizes, uploaded
                      after them. A checkpoint is complete when all W markers are there and
                      every file they list has its size; anything else is torn and never resumed.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

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
    worker_nodes: list[str] = field(default_factory=list)  # the Ray node of each rank
    worker_peak_rss_mb: list[float] = field(default_factory=list)  # each rank's, at the end
    # full fine-tune: the base's held-out metrics, measured before the first step
    base_metrics: dict = field(default_factory=dict)
    # checkpoints found torn when resuming: {"checkpoint": name, "reason": why}
    skipped_checkpoints: list[dict] = field(default_factory=list)

    def record_eval(self, step: int, loss: float) -> bool:
        """Returns True when this eval improved on the best so far."""
        self.evals.append({"step": step, "eval_loss": loss})
        if self.best_eval_loss is None or loss < self.best_eval_loss:
            self.best_eval_loss, self.evals_without_improvement = loss, 0
            return True
        self.evals_without_improvement += 1
        return False


def save_checkpoint(
    directory: Path, par, tokenizer, state: TrainerState, rank: int, final: bool = False
) -> None:
    """Every rank calls this: the sharded strategies gather and save collectively."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), directory / f"rng_rank{rank}.pt")
    par.save_state(directory)
    # the adapter is small: every checkpoint has it; a full model is gathered once, at the end
    if par.lora or final:
        weights = par.gathered_state_dict(trainable_only=par.lora)
        if rank == 0:
            # the failure peers ship silently (peft#453): an adapter saved empty or partial
            if par.lora and len(weights) != par.trainable_tensors:
                raise RuntimeError(
                    f"gathered {len(weights)} adapter tensors, expected {par.trainable_tensors}: "
                    "refusing to save an incomplete adapter"
                )
            out = directory / ("adapter" if par.lora else "model")
            par.module.save_pretrained(out, state_dict=weights)
            tokenizer.save_pretrained(out)
    if rank == 0:
        (directory / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))


def load_checkpoint(directory: Path, par, rank: int) -> TrainerState:
    """Restore weights, optimizer and scheduler (the strategy's own format) and this rank's RNG."""
    state = read_trainer_state(directory)
    par.load_state(directory)
    rng_file = directory / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def read_trainer_state(directory: Path) -> TrainerState:
    return TrainerState(**json.loads((Path(directory) / "trainer_state.json").read_text()))


# ------------------------------------------------------------------- commit markers

MARKER = re.compile(r"COMMIT_rank(\d+)_of(\d+)\.json")
CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)(_final)?")


def write_commit_marker(directory: Path, rank: int, world: int, step: int) -> Path:
    """This rank's marker, listing the files it wrote; the uploader sends it last."""
    files = {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not MARKER.fullmatch(p.name)
    }
    marker = directory / f"COMMIT_rank{rank}_of{world}.json"
    marker.write_text(json.dumps({"step": step, "rank": rank, "world": world, "files": files}))
    return marker


def torn_reason(fs, path: str) -> str | None:
    """None when the checkpoint at (pyarrow fs, path) is complete, else why it is not."""
    import pyarrow.fs

    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        return "missing"
    sizes = {
        i.path[len(path.rstrip("/")) + 1 :]: i.size
        for i in infos
        if i.type == pyarrow.fs.FileType.File
    }
    markers = {int(m[1]): int(m[2]) for n in sizes if (m := MARKER.fullmatch(n))}
    if not markers:
        return "no commit marker (written last: the upload did not finish)"
    world = max(markers.values())
    missing = [r for r in range(world) if markers.get(r) != world]
    if missing:
        return f"no commit marker from rank(s) {missing} of {world}"
    for rank in range(world):
        with fs.open_input_stream(f"{path}/COMMIT_rank{rank}_of{world}.json") as f:
            listed = json.loads(f.read())["files"]
        for name, size in listed.items():
            if sizes.get(name) != size:
                return f"{name}: {sizes.get(name, 'missing')} bytes, rank {rank} wrote {size}"
    return None


def checkpoint_step(name: str) -> int | None:
    m = CHECKPOINT_NAME.fullmatch(name)
    return int(m[1]) if m else None


def newest_complete_checkpoint(fs, run_path: str) -> tuple[str | None, list[dict]]:
    """(path of the newest complete checkpoint under run_path or None, the torn ones newer than it)."""
    import pyarrow.fs

    try:
        entries = fs.get_file_info(pyarrow.fs.FileSelector(run_path))
    except FileNotFoundError:
        return None, []
    dirs = [
        (checkpoint_step(e.base_name), e.base_name.endswith("_final"), e.path)
        for e in entries
        if e.type == pyarrow.fs.FileType.Directory and checkpoint_step(e.base_name) is not None
    ]
    skipped = []
    for _, _, path in sorted(dirs, reverse=True):
        reason = torn_reason(fs, path)
        if reason is None:
            return path, skipped
        skipped.append({"checkpoint": path.rsplit("/", 1)[-1], "reason": reason})
    return None, skipped
