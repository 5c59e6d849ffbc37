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
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from jobs.distributed import print0, rng_state, set_rng_state
from jobs.durable import MARKER, Preemption, Uploader


@dataclass
class TrainerState:
    step: int = 0
    history: list[dict] = field(default_factory=list)  # one row per optimizer step
    evals: list[dict] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)  # the step of each restart or re-run
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

CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)(_final)?(_retry\d+)?")


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


def checkpoint_dir_name(step: int, final: bool, torn: set[str]) -> str:
    """checkpoint_STEP[_final]; beside a torn checkpoint of the same step (a resume past it) it
    is checkpoint_STEP[_final]_retryN. Ray may have registered the torn one before it was torn:
    a second checkpoint at its path would be two entries of Ray's for one directory, and keep_last
    would delete it twice (FileNotFoundError in the Train controller)."""
    name = f"checkpoint_{step:06d}" + ("_final" if final else "")
    retry, base = 0, name
    while name in torn:
        retry += 1
        name = f"{base}_retry{retry}"
    return name


def checkpoint_step(name: str) -> int | None:
    m = CHECKPOINT_NAME.fullmatch(name)
    return int(m[1]) if m else None


def checkpoint_dirs(fs, run_path: str) -> list[tuple[int, bool, str]]:
    """(step, final?, path) of every checkpoint directory under run_path, oldest first."""
    import pyarrow.fs

    try:
        entries = fs.get_file_info(pyarrow.fs.FileSelector(run_path))
    except FileNotFoundError:
        return []
    return sorted(
        (checkpoint_step(e.base_name), "_final" in e.base_name, e.path)
        for e in entries
        if e.type == pyarrow.fs.FileType.Directory and checkpoint_step(e.base_name) is not None
    )


def newest_complete_checkpoint(fs, run_path: str) -> tuple[str | None, list[dict]]:
    """(path of the newest complete checkpoint under run_path or None, the torn ones newer than it)."""
    skipped = []
    for _, _, path in reversed(checkpoint_dirs(fs, run_path)):
        reason = torn_reason(fs, path)
        if reason is None:
            return path, skipped
        skipped.append({"checkpoint": path.rsplit("/", 1)[-1], "reason": reason})
    return None, skipped


# ------------------------------------------------------------------- resume and save, on Ray Train


def remove_old_checkpoints(fs, run_path: str, keep: int | None) -> None:
    """Ray Train's CheckpointConfig(num_to_keep) for a job in this process (scaling.local),
    which Ray's local mode does not apply: the newest `keep` checkpoints stay."""
    if keep is None:
        return
    for _, _, path in checkpoint_dirs(fs, run_path)[:-keep]:
        fs.delete_dir(path)


def run_storage(cfg) -> tuple:
    """(pyarrow filesystem, path) of the run's directory: Ray Train's storage context on a
    worker; the same place, from the config, for a job in this process (scaling.local)."""
    import ray.train

    if not cfg.scaling.local:
        context = ray.train.get_context().get_storage()
        return context.storage_filesystem, context.experiment_fs_path
    import pyarrow.fs

    from core.storage import ray_storage

    path, fs = ray_storage(cfg.checkpoint.storage_path)
    if fs is None:
        fs, path = pyarrow.fs.LocalFileSystem(), os.path.abspath(path)
    return fs, f"{path}/{cfg.run.name}"


def stored_checkpoint(cfg):
    """The run's newest complete checkpoint in storage (None when there is none): how a job in
    this process (scaling.local) ends, as Ray's local mode records none inside a Tune trial."""
    import ray.train

    fs, run_path = run_storage(cfg)
    path, _ = newest_complete_checkpoint(fs, run_path)
    return ray.train.Checkpoint(path=path, filesystem=fs) if path else None


def resume(cfg, par, rank: int, total_steps: int) -> TrainerState:
    """The state of the newest complete checkpoint of this run, loaded into `par`; a fresh state
    when there is none. Torn checkpoints are skipped, with a warning, and recorded.

    Looks at storage itself, not only at Ray's record of registered checkpoints: after a driver
    is killed and the run resubmitted, what is in storage is what counts. A step's examples do not
    depend on the worker count, so a resume may change it."""
    import ray.train

    fs, run_path = run_storage(cfg)
    path, torn = newest_complete_checkpoint(fs, run_path)
    for t in torn:
        print0(f"WARNING: skipping torn checkpoint {t['checkpoint']}: {t['reason']}")
    state = TrainerState()
    if path:
        checkpoint = ray.train.Checkpoint(path=path, filesystem=fs)
        with checkpoint.as_directory() as ckpt_dir:
            state = load_checkpoint(Path(ckpt_dir), par, rank)
        state.resumed_at.append(state.step)
        print0(f"resumed from {checkpoint.path} at step {state.step}/{total_steps}")
    state.skipped_checkpoints += torn
    return state


class Checkpointer:
    """A worker's checkpoints: staged on local disk, saved by every rank (the sharded strategies
    gather collectively), committed with this rank's marker, reported to Ray Train and uploaded
    in the background; logged to the tracker once in storage; one more on SIGTERM before exiting.

    `ray.train.report` costs about a second on a small machine: it is called only here, at
    eval/checkpoint steps. As a context manager it hands SIGTERM back to Ray on the way out."""

    def __init__(self, cfg, rt, par, tokenizer, state: TrainerState, tracker, on_report=None):
        self.cfg, self.rt, self.par, self.tokenizer = cfg, rt, par, tokenizer
        self.state, self.tracker = state, tracker
        self.on_report = on_report  # a sweep trial in this process (scaling.local): Tune's report
        self.torn = {t["checkpoint"] for t in state.skipped_checkpoints}
        ck = cfg.checkpoint
        self.uploader = Uploader(
            run_storage(cfg), ck.upload_retry_s, ck.max_pending_uploads, log=self._log
        )
        # a job in this process (scaling.local) leaves SIGTERM to the process that runs it
        self.preemption = Preemption(ck.save_on_sigterm and not cfg.scaling.local)

    def _log(self, message: str) -> None:  # every rank's uploads, not only rank 0's
        print(f"[rank {self.rt.rank}] {message}", flush=True)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.preemption.exit_if_signalled()
            self.preemption.close()

    def sigterm_requested(self) -> bool:
        """A spot node going away (any rank signalled): every rank saves now."""
        return self.preemption.requested(self.rt.world)

    def exit_if_signalled(self) -> None:
        self.preemption.exit_if_signalled()

    def stop(self) -> None:
        """Training stops here on purpose (run.stop_after_steps): SIGTERM goes back to Ray."""
        self.preemption.close()

    def save(self, metrics: dict, final: bool = False, now: bool = False) -> None:
        """Save, commit and report a checkpoint with `metrics`. The upload runs in the background
        (storage may be down) unless this is the final checkpoint or one before exiting (`now`)."""
        import ray.train

        step, staged = self.state.step, self.uploader.stage()
        try:
            save_checkpoint(staged, self.par, self.tokenizer, self.state, self.rt.rank, final)
            write_commit_marker(staged, self.rt.rank, self.rt.world, step)
        except BaseException:
            self.uploader.unstage(staged)
            raise
        checkpoint = ray.train.Checkpoint.from_directory(str(staged))
        name = checkpoint_dir_name(step, final, self.torn)
        if self.cfg.scaling.local:  # uploaded here; the run's end is read from storage (fit)
            checkpoint = self.uploader.upload(checkpoint, name)
            up = self.uploader
            remove_old_checkpoints(up.fs, up.root, self.cfg.checkpoint.keep_last)
            if self.on_report:  # a Tune trial (which refuses ray.train.report): it may stop here
                self.on_report(metrics, checkpoint.path)
            return
        mode = ray.train.CheckpointUploadMode
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=name,
            checkpoint_upload_mode=mode.SYNC if final or now else mode.ASYNC,
            checkpoint_upload_fn=self.uploader.upload,
            delete_local_checkpoint_after_upload=False,  # the uploader removes it, on any outcome
        )

    def log_uploaded(self) -> None:
        """A checkpoint is logged to the tracker as saved once it is in storage."""
        run_dir = f"{self.cfg.checkpoint.storage_path}/{self.cfg.run.name}"
        while self.uploader.saved:
            name = self.uploader.saved.pop(0)
            self.tracker.log_checkpoint(f"{run_dir}/{name}", checkpoint_step(name))
