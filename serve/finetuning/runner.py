"""The Ray job of one fine-tuning job: `python -m serve.finetuning.runner JOB_ID [--resume]`,
with the database URL in RAYFT_FT_DATABASE_URL. It moves the job through validating_files ->
queued -> running -> succeeded (or failed) and writes its events; the API never trains.

Flow: validate the files (the first bad row fails the job, naming its line) -> train with
jobs.finetune.run_job (the job's JobConfig; a second attempt resumes from the newest checkpoint)
-> evaluate and gate (tune.evaluate; the base model's eval YAML or the built-in held-out loss
gate) -> promote into the registry (tune.registry.promote) as the ft: model -> a metrics CSV as a file.
Every status change is conditional (db.set_status): a job cancelled meanwhile stays cancelled.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import traceback
from typing import Any

from core import storage
from core.registry import DEFAULT_ALIAS
from inference.config import ModelConfig
from inference.model import load_tokenizer
from jobs.config import JobConfig
from jobs.finetune import last_cause, run_job
from serve.finetuning import db, models
from serve.finetuning.files import FileStore
from serve.finetuning.launcher import DB_ENV
from serve.finetuning.progress import Progress
from serve.finetuning.validate import Checked, InvalidFile, check_file, write_pairs
from tune.evaluate import EvalSuiteConfig, GateConfig, TaskConfig, evaluate_target, load_eval_config
from tune.registry import Registry
from tune.registry.promote import gate_and_promote, promote_run
from tune.servability import ServingLimits

LIVE = ("validating_files", "queued", "running")


class JobFailed(Exception):
    def __init__(self, error: dict[str, Any]):
        super().__init__(error["message"])
        self.error = error


def event(sessions, job: db.JobRow, key: str, message: str, **kw) -> None:
    db.add_event(sessions, job.id, key, message, **kw)


def validate_files(sessions, job: db.JobRow) -> Checked:
    """Check the training (and validation) file; dpo rows are rewritten as pairs for training."""
    event(sessions, job, "validating", f"Validating training file: {job.training_file}")
    cfg = JobConfig.model_validate(job.job_config)
    tokenizer = load_tokenizer(ModelConfig.model_validate(job.job_config["model"]))
    kind = cfg.train.method
    checked = None
    for param, file_id, target in (
        ("training_file", job.training_file, cfg.data.train_files),
        ("validation_file", job.validation_file, cfg.data.eval_files),
    ):
        if file_id is None:
            continue
        with sessions() as s:
            row = s.get(db.FileRow, file_id)
        if row is None:
            raise InvalidFile(f"{param} {file_id} was deleted before the job started", param)
        result = check_file(row.uri, row.filename, param, kind, tokenizer)
        if kind == "dpo":
            write_pairs(result.pairs, target[0])
        checked = checked or result
    event(sessions, job, "validated", f"Files validated: {checked.rows} training examples")
    return checked


def total_steps(cfg: JobConfig, rows: int) -> int:
    """The steps the job will take (an estimate before the held-out split is cut)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    train_rows = rows if cfg.data.eval_files else int(rows * (1 - cfg.data.eval_fraction))
    return max(1, train_rows // cfg.train.effective_batch_size) * cfg.train.epochs


def default_eval() -> EvalSuiteConfig:
    """The built-in gate: the adapter's loss on the run's held-out rows must beat the base's."""
    task = TaskConfig(name="heldout", data=None, metrics=["loss"], few_shot=0, max_samples=200)
    return EvalSuiteConfig(tasks=[task], gate=GateConfig(metric="heldout.loss", margin=0.0))


def gate_and_register(sessions, job: db.JobRow, run_dir: str, registry: Registry) -> str:
    """Evaluate, gate and promote; the registry version that the ft: model now serves."""
    runner = job.runner
    name = job.id
    limits = ServingLimits(max_lora_rank=runner["max_lora_rank"])
    kind = job.method["type"]
    if not runner["gate"] or (runner["eval"] is None and kind in ("dpo", "reinforcement")):
        why = "gate off (rayft.gate: false)" if not runner["gate"] else f"{kind}: no built-in gate"
        event(sessions, job, "gate", f"Promoted without an evaluation gate ({why})", level="warn")
        return promote_run(registry, run_dir, name, force=True, limits=limits)
    cfg = load_eval_config(runner["eval"]) if runner["eval"] else default_eval()
    event(sessions, job, "evaluating", "Evaluating the fine-tuned model against the base model")
    results, _ = evaluate_target(run_dir, cfg)
    gate = results["gate"]
    summary = (
        f"{gate['metric']}: {gate['adapter']:.4f} vs {gate['best_baseline']} {gate['baseline']:.4f}"
    )
    if not gate["passed"]:
        raise JobFailed(
            {
                "code": "evaluation_gate_failed",
                "message": "The fine-tuned model did not pass the evaluation gate: "
                + "; ".join(gate["reasons"]),
                "param": None,
            }
        )
    event(sessions, job, "gate", f"Evaluation gate passed ({summary})", data=gate)
    return gate_and_promote(registry, run_dir, name, DEFAULT_ALIAS, results, limits).version


def metrics_csv(summary: dict) -> bytes:
    evals = {e["step"]: e["eval_loss"] for e in summary.get("eval_history", [])}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["step", "train_loss", "valid_loss", "learning_rate"])
    for row in summary["loss_history"]:
        writer.writerow([row["step"], row["loss"], evals.get(row["step"], ""), row["lr"]])
    return out.getvalue().encode()


def result_file(sessions, job: db.JobRow, summary: dict) -> str:
    data = metrics_csv(summary)
    file_id = f"file-{job.id.removeprefix('ftjob-')}"  # one per job: a rerun writes the same
    uri = FileStore(job.runner["files"]).put_bytes(job.tenant, file_id, data, ".csv")
    with db.transaction(sessions) as s:
        if s.get(db.FileRow, file_id) is None:
            s.add(
                db.FileRow(
                    id=file_id,
                    tenant=job.tenant,
                    filename="step_metrics.csv",
                    purpose="fine-tune-results",
                    bytes=len(data),
                    sha256="",
                    uri=uri,
                    created_at=db.now(),
                    ordinal=db.ordinal(),
                )
            )
    return file_id


def train(sessions, job: db.JobRow, rows: int) -> dict:
    cfg = JobConfig.model_validate(job.job_config)
    registry = Registry(job.runner["registry"])
    progress = Progress(sessions, job, registry, total_steps(cfg, rows))
    progress.start(job.runner["progress_every_s"])
    try:
        summary = run_job(cfg, os.environ.get("RAY_ADDRESS"))
    finally:
        progress.stop()
    progress.scan()  # checkpoints the watcher had not reached
    progress.steps(summary["loss_history"], summary.get("eval_history", []))
    return summary


def succeed(sessions, job: db.JobRow, summary: dict, tokens_per_row: float) -> None:
    run_dir = storage.join(job.job_config["checkpoint"]["storage_path"], job.id)
    version = gate_and_register(sessions, job, run_dir, Registry(job.runner["registry"]))
    model = models.model_id(job.model, job.tenant, job.suffix, job.id)
    trained = int(
        tokens_per_row * summary["steps"] * job.job_config["train"]["effective_batch_size"]
    )
    files = [result_file(sessions, job, summary)]
    if db.set_status(
        sessions,
        job.id,
        "succeeded",
        only_from=("running",),
        fine_tuned_model=model,
        trained_tokens=trained,
        result_files=files,
        estimated_finish=None,
    ):
        event(sessions, job, "succeeded", f"The job has successfully completed ({model}@{version})")


def run(sessions, job_id: str, resume: bool) -> None:
    job = db.get_job(sessions, job_id)
    rows = 0
    if not resume:
        checked = validate_files(sessions, job)
        rows, tokens_per_row = checked.rows, checked.tokens / checked.rows
        db.update_job(
            sessions, job.id, runner={**job.runner, "rows": rows, "tokens_per_row": tokens_per_row}
        )
        if not db.set_status(sessions, job.id, "queued", only_from=("validating_files",)):
            return
        event(sessions, job, "queued", "Fine-tuning job queued")
    job = db.get_job(sessions, job_id)
    if not db.set_status(sessions, job.id, "running", only_from=("queued",)):
        return  # cancelled or paused meanwhile
    event(
        sessions,
        job,
        f"running-{job.attempt}",
        "Fine-tuning job started" + (" (resumed)" if resume else ""),
    )
    summary = train(sessions, job, job.runner.get("rows", rows))
    succeed(sessions, job, summary, job.runner.get("tokens_per_row", 0.0))


def redacted(sessions, job_id: str, message: str) -> str:
    """A message without this deployment's storage paths (a client sees only its file ids)."""
    job = db.get_job(sessions, job_id)
    roots = [job.runner.get("files"), job.runner.get("registry")]
    roots.append(job.job_config.get("checkpoint", {}).get("storage_path"))
    for root in filter(None, roots):
        message = message.replace(root, "<storage>")
    return message


def fail(sessions, job_id: str, error: dict) -> None:
    if db.set_status(
        sessions, job_id, "failed", only_from=LIVE, error=error, estimated_finish=None
    ):
        db.add_event(
            sessions, job_id, "failed", f"The job failed: {error['message']}", level="error"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job_id")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    sessions = db.connect(os.environ[DB_ENV])
    try:
        run(sessions, args.job_id, args.resume)
    except InvalidFile as e:
        fail(sessions, args.job_id, e.error)
        return 1
    except JobFailed as e:
        fail(sessions, args.job_id, e.error)
        return 1
    except Exception as e:
        traceback.print_exc()
        message = redacted(sessions, args.job_id, f"Training failed: {last_cause(e)}")
        fail(sessions, args.job_id, {"code": "training_failed", "message": message, "param": None})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
