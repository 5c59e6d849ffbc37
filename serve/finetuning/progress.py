"""A running job's progress, read from its checkpoints while Ray Train writes them: one event
per optimizer step, and each complete checkpoint registered (servable at once as
ft:...:ckpt-step-N) and recorded. Everything here is idempotent: a runner started again, or the
final pass after training, writes only what is missing."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.fs
from sqlalchemy import select

from core import storage
from jobs.checkpointing import checkpoint_step, torn_reason
from serve.finetuning import db, models
from tune.registry import Registry

log = logging.getLogger(__name__)


def pyarrow_fs(url: str):
    path, fs = storage.ray_storage(url)
    return (fs or pyarrow.fs.LocalFileSystem()), path


class Progress:
    def __init__(self, sessions, job: db.JobRow, registry: Registry, total_steps: int):
        self.sessions, self.job, self.registry = sessions, job, registry
        self.total_steps = total_steps
        self.run_url = storage.join(job.job_config["checkpoint"]["storage_path"], job.id)
        self.model_id = models.model_id(job.model, job.tenant, job.suffix, job.id)
        self.started = time.time()
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the watcher thread ---------------------------------------------------------------
    def start(self, every_s: float) -> None:
        self._thread = threading.Thread(target=self._loop, args=(every_s,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.scan()
            except Exception as e:  # progress is best effort; the final pass repeats it
                log.warning("progress scan failed: %s: %s", type(e).__name__, e)

    # --- what a scan writes -----------------------------------------------------------------
    def scan(self) -> None:
        fs, run_path = pyarrow_fs(self.run_url)
        try:
            entries = fs.get_file_info(pyarrow.fs.FileSelector(run_path))
        except FileNotFoundError:
            return
        names = sorted(
            e.base_name
            for e in entries
            if e.type == pyarrow.fs.FileType.Directory and checkpoint_step(e.base_name) is not None
        )
        for name in names:
            if name not in self.seen and torn_reason(fs, f"{run_path}/{name}") is None:
                self.checkpoint(name)
                self.seen.add(name)

    def checkpoint(self, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            url = storage.join(self.run_url, name)
            try:
                local = storage.get_dir(url, tmp, ("trainer_state.json", "adapter"))
            except (FileNotFoundError, OSError):
                return  # removed by keep_last while we read it: a later one will do
            state = json.loads((Path(local) / "trainer_state.json").read_text())
            self.steps(state["history"], state.get("evals", []))
            if (Path(local) / "adapter" / "adapter_config.json").is_file():
                self.register(Path(local) / "adapter", state)

    def steps(self, history: list[dict], evals: list[dict]) -> None:
        valid = {e["step"]: e["eval_loss"] for e in evals}
        for row in history:
            step = row["step"]
            # the total is an estimate (dedup and the held-out split are decided in the job)
            data = {
                "step": step,
                "train_loss": row["loss"],
                "estimated_total_steps": self.total_steps,
            }
            text = f"Step {step}: training loss={row['loss']:.4f}"
            if step in valid:
                data["valid_loss"] = valid[step]
                text += f", validation loss={valid[step]:.4f}"
            db.add_event(
                self.sessions, self.job.id, f"step-{step}", text, type="metrics", data=data
            )
        if history:
            self.estimate(history[-1]["step"])

    def estimate(self, done: int) -> None:
        elapsed = time.time() - self.started
        if 0 < done < self.total_steps:
            left = elapsed / done * (self.total_steps - done)
            db.update_job(self.sessions, self.job.id, estimated_finish=int(time.time() + left))

    def register(self, adapter: Path, state: dict) -> None:
        """The checkpoint's adapter as a registry version with alias step-N, and its record."""
        step = state["step"]
        lineage = {
            "fine_tuning_job": self.job.id,
            "tenant": self.job.tenant,
            "base_model": self.job.job_config["model"]["name_or_path"],
            "checkpoint_step": step,
        }
        name = models.RESERVED + self.job.id.removeprefix(models.RESERVED)
        version = self.registry.register(adapter, name, lineage)
        self.registry.set_alias(name, models.checkpoint_alias(step), version, reason="checkpoint")
        evals = {e["step"]: e["eval_loss"] for e in state.get("evals", [])}
        last = next((r for r in state["history"] if r["step"] == step), {})
        metrics = {"step": step, "train_loss": last.get("loss"), "valid_loss": evals.get(step)}
        with db.transaction(self.sessions) as s:
            if s.scalar(
                select(db.CheckpointRow.id).where(
                    db.CheckpointRow.job_id == self.job.id, db.CheckpointRow.step == step
                )
            ):
                return
            s.add(
                db.CheckpointRow(
                    id=db.new_id("ftckpt"),
                    job_id=self.job.id,
                    step=step,
                    metrics=metrics,
                    model_id=models.checkpoint_model_id(self.model_id, step),
                    created_at=db.now(),
                )
            )
        db.add_event(
            self.sessions,
            self.job.id,
            f"checkpoint-{step}",
            f"Checkpoint created at step {step} ({version})",
        )
