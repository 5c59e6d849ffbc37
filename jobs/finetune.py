"""The fine-tuning job: a JSONL file in, an evaluated peft adapter (or model) out.

    python -m jobs.finetune configs/quickstart.yaml [key.sub=value ...]
    ray job submit --working-dir . -- python -m jobs.finetune configs/quickstart.yaml

The driver (`run_job`) validates the config and the data before any worker starts, then runs
`train_func` on Ray Train workers. `train_func` reads top to bottom: setup, resume, the loop, the
final evaluation (base vs tuned) and the final save. What a step computes is the objective's
(jobs/objectives/: SFT, DPO, GRPO); how the model is spread over workers is jobs/parallel.py; how
checkpoints survive lost workers and storage is jobs/checkpointing.py. Re-running with the same
run.name resumes from the newest checkpoint in STORAGE_PATH/RUN_NAME.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from transformers import get_cosine_schedule_with_warmup

from core import cli, storage
from core.config import ConfigError
from core.ray_cluster import init_ray, shutdown_ray
from inference.model import load_base_model, load_tokenizer
from inference.runtime import Runtime
from jobs.batching import epoch_permutation, step_micro_batches
from jobs.checkpointing import (
    Checkpointer,
    TrainerState,
    read_trainer_state,
    resume,
    stored_checkpoint,
)
from jobs.config import JobConfig, load_config
from jobs.data import load_for_job, summary_lines, tokens_dir
from jobs.data.stored import StoredSplit, remove
from jobs.distributed import all_gather_objects, print0, seed_everything
from jobs.memory import preflight_memory
from jobs.model import add_lora, enable_activation_offloading, enable_gradient_checkpointing
from jobs.objectives import Objective, StepResult, make_objective, objective_class
from jobs.parallel import Parallel, deepspeed_config, job_runtime, make_parallel
from jobs.profiling import StepProfiler
from jobs.run_record import write_run_manifest
from jobs.step_metrics import ModelFlops, memory_kind, mfu, peak_memory_mb
from jobs.tracking import start_tracker, tracking_run_info


@dataclass
class StepPlan:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(n_train: int, cfg: JobConfig) -> StepPlan:
    """How many optimizer steps the run takes; fails when the data cannot fill one step."""
    steps_per_epoch = n_train // cfg.train.effective_batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.effective_batch_size: {n_train} training examples cannot fill one step of "
            f"{cfg.train.effective_batch_size} examples; lower the batch size or add data"
        )
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    window = cfg.train.profile_steps
    if window and window[1] > total:
        raise ConfigError(
            f"train.profile_steps: step {window[1]} is past the run's last step ({total})"
        )
    return StepPlan(steps_per_epoch, total, math.ceil(cfg.train.warmup_ratio * total))


# ------------------------------------------------------------------------ the train function


def train_func(config: dict) -> None:
    """Runs on every Ray Train worker: setup -> resume -> the loop -> final evaluation and save."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = JobConfig.model_validate(config["job"])
    data = config["data"]  # StoredSplits: where on storage each split lies (jobs/data/stored.py)
    rt = job_runtime(cfg, ray.train.torch.get_device())
    plan = plan_steps(len(data["train"]), cfg)
    tokenizer, par = setup(cfg, rt, plan)
    obj = make_objective(cfg, rt, tokenizer, data)

    on_report = config.get("on_report")  # a sweep trial in this process (scaling.local)
    state = resume(cfg, par, rt.rank, plan.total_steps)
    if state.completed:
        print0("this run already finished; nothing to train")
        report = on_report or ray.train.report  # ray.train.report refuses a Tune trial
        report({"step": state.step, **state.final_metrics}, None)
        return
    # the tracker is rank 0's; it is finished on the way out, and marked failed on an exception
    with (
        start_tracker(cfg, config["run_info"], plan.total_steps) as tracker,
        Checkpointer(cfg, rt, par, tokenizer, state, tracker, on_report) as ckpt,
        closing(obj),  # what the objective started (GRPO's rollout actors)
        StepProfiler(cfg, rt.rank, rt.device) as profiler,  # train.profile_steps
    ):
        state.worker_nodes = all_gather_objects(ray.get_runtime_context().get_node_id())
        batches = StepBatches(cfg, rt, obj, plan)
        obj.start(par, state, batches.micro_batches, plan.total_steps)
        if obj.evaluates_before_training() and state.step == 0:
            print0("evaluating the base model before training")
            state.base_metrics = obj.evaluate(par, full=True)
        par.model.train()
        print0(
            f"training {plan.total_steps} steps ({plan.steps_per_epoch}/epoch) on {rt.world} "
            f"worker(s) with {cfg.train.strategy}, {cfg.grad_accum_steps} accumulation step(s) "
            f"of {cfg.train.micro_batch_size} per worker, device {rt.device}"
        )

        # --- the loop
        run = TrainingRun(cfg, obj, par, state, tracker, ckpt, plan)
        meter = Throughput()
        while state.step < plan.total_steps and not state.stopped_early:
            profiler.before(state.step + 1)
            micro_batches = batches.micro_batches(state.step)
            t0 = time.perf_counter()
            step = obj.train_step(par, micro_batches)
            state.step += 1
            seconds = time.perf_counter() - t0
            meter.add(state.step, step.tokens, seconds, run.step_flops(micro_batches, step))
            profiler.after(state.step)
            metrics = run.record(step, meter)
            if run.evaluate_and_checkpoint(metrics):
                print0(
                    f"stopping after step {state.step} (run.stop_after_steps); run again to continue"
                )
                ckpt.stop()
                return

        # --- final evaluation (base vs tuned) and the final checkpoint
        final = final_evaluation(obj, par, state, meter)
        ckpt.save(final, final=True)
        ckpt.log_uploaded()
        tracker.summary(final)


def final_evaluation(obj: Objective, par: Parallel, state: TrainerState, meter) -> dict:
    """The held-out set with the adapter and without it (the base); the run is then complete."""
    print0("final evaluation: base vs fine-tuned on the held-out set")
    final = {"step": state.step, "train_tokens_per_s": meter.rate()}
    final |= {f"base_{k}": v for k, v in obj.base_metrics(par, state).items()}
    final |= obj.evaluate(par, full=True)
    state.completed, state.final_metrics = True, final
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    state.worker_peak_rss_mb = all_gather_objects(round(peak_rss_mb, 1))
    return final


def setup(cfg: JobConfig, rt: Runtime, plan: StepPlan) -> tuple[object, Parallel]:
    """Threads, seeds, tokenizer, the model (+ LoRA) and the strategy that spreads it over the
    workers, which owns the optimizer and the learning-rate schedule."""
    if rt.device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    seed_everything(cfg.run.seed)  # identical LoRA init on every rank
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, rt.device)
    if cfg.lora is not None:
        model = add_lora(model, cfg.lora)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.train.activation_offloading:
        enable_activation_offloading(model, rt.device)
        if rt.device.type == "cpu":
            print0("train.activation_offloading: the device is the CPU, so nothing is moved")
    seed_everything(cfg.run.seed + rt.rank)  # distinct dropout masks per rank
    par = make_parallel(cfg, rt)
    train = cfg.train
    par.setup(
        model,
        lambda params: torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay),
        lambda opt: get_cosine_schedule_with_warmup(opt, plan.warmup_steps, plan.total_steps),
    )
    return tokenizer, par


class StepBatches:
    """This rank's micro-batches of each step. The example order is a function of (seed, epoch)
    and a step's examples do not depend on the worker count: a resume continues exactly."""

    def __init__(self, cfg: JobConfig, rt: Runtime, obj: Objective, plan: StepPlan):
        self.cfg, self.rt, self.obj, self.plan = cfg, rt, obj, plan
        self.epoch, self.order = -1, []

    def micro_batches(self, step: int) -> list[dict]:
        epoch, k = divmod(step, self.plan.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.order = epoch_permutation(len(self.obj.train_examples), self.cfg.run.seed, epoch)
        train, rt = self.cfg.train, self.rt
        indices = step_micro_batches(
            self.order, k, train.effective_batch_size, rt.rank, rt.world, train.micro_batch_size
        )
        examples = self.obj.train_examples
        if isinstance(examples, StoredSplit):  # each row group this rank needs is read once
            return [self.obj.batch(examples.take(idx)) for idx in indices]
        return [self.obj.batch([examples[j] for j in idx]) for idx in indices]


class Throughput:
    """Training tokens and model FLOPs per second over every rank, step 1 left out (it pays
    one-off costs: allocations, lazy init)."""

    def __init__(self):
        self.tokens, self.seconds, self.flops = 0, 0.0, 0.0

    def add(self, step: int, tokens: int, seconds: float, flops: float = 0.0) -> None:
        if step > 1:
            self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
            self.flops += flops

    def rate(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def flops_rate(self) -> float:
        return self.flops / max(self.seconds, 1e-9)


@dataclass
class TrainingRun:
    """What the loop's bookkeeping needs: logging a step, evaluating, checkpointing when due."""

    cfg: JobConfig
    obj: Objective
    par: Parallel
    state: TrainerState
    tracker: object
    ckpt: Checkpointer
    plan: StepPlan

    def __post_init__(self):
        self.model_flops = ModelFlops.of(self.par.module)

    def step_flops(self, micro_batches: list[dict], step: StepResult) -> float:
        return self.model_flops.step(micro_batches, step.tokens, self.cfg.data.max_seq_len)

    def costs(self, meter: Throughput) -> dict:
        """What the steps cost so far: the last step's gradient norm (before clipping), tokens/s
        over every rank, rank 0's peak memory, and the MFU (None on a CPU or an unknown GPU)."""
        device, timed = self.par.device, meter.seconds > 0  # step 1 is not timed
        return {
            "grad_norm": self.par.last_grad_norm,
            "tokens_per_s": meter.rate() if timed else None,
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "mfu": mfu(meter.flops_rate() / self.par.world, device) if timed else None,
        }

    def record(self, step: StepResult, meter: Throughput) -> dict:
        """The step in the history, on the progress line and in the tracker; its Ray metrics."""
        state, lr, total = self.state, self.par.last_lr(), self.plan.total_steps
        epoch = (state.step - 1) // self.plan.steps_per_epoch
        costs = self.costs(meter)
        state.history.append(
            {"step": state.step, "loss": step.loss, "lr": lr, "epoch": epoch, **costs}
            | step.metrics
        )
        if state.step % self.cfg.train.log_every_steps == 0 or state.step == total:
            shown = "".join(
                f" | {k} {step.metrics[k]:.3f}"
                for k in self.obj.shown_on_progress
                if k in step.metrics
            )
            print0(
                f"step {state.step}/{total} | loss {step.loss:.4f}{shown} | lr {lr:.2e} | "
                f"{self.cost_text(costs, meter)}"
            )
            logged = {"train/loss": step.loss, "train/lr": lr, "train/tokens_per_s": meter.rate()}
            logged |= {f"train/{k}": v for k, v in costs.items() if v is not None}
            self.tracker.log(logged | self.obj.tracked("train", step.metrics), state.step)
        return {"step": state.step, "loss": step.loss, "train_tokens_per_s": meter.rate()}

    def cost_text(self, costs: dict, meter: Throughput) -> str:
        norm = costs["grad_norm"]
        text = f"grad norm {norm:.3f} | " if norm is not None else "grad norm n/a | "
        text += f"{meter.rate():,.0f} tok/s | peak mem {costs['peak_memory_mb']:,.0f} MiB "
        text += f"({memory_kind(self.par.device)}, rank 0)"
        return text + (f" | MFU {costs['mfu']:.1%}" if costs["mfu"] is not None else "")

    def evaluate(self, metrics: dict) -> None:
        """The in-loop evaluation: recorded, tracked, and the early-stopping count kept."""
        state = self.state
        extra = self.obj.evaluate(self.par, full=False)
        loss = metrics["eval_loss"] = extra.pop("eval_loss")
        improved = state.record_eval(state.step, loss)
        state.evals[-1].update(extra)
        metrics |= extra
        extra = {k.removeprefix("eval_"): v for k, v in extra.items()}
        self.tracker.log({"eval/loss": loss} | self.obj.tracked("eval", extra), state.step)
        shown = "".join(f" | {k} {metrics[k]:.3f}" for k in self.obj.shown_on_eval)
        print0(
            f"eval at step {state.step}: loss {loss:.4f}{shown}" + (" (best)" if improved else "")
        )
        patience = self.cfg.eval.early_stopping_patience
        if patience and state.evals_without_improvement >= patience:
            state.stopped_early = True
            print0(f"early stop: eval loss has not improved for {patience} evals")

    def evaluate_and_checkpoint(self, metrics: dict) -> bool:
        """Evaluate and checkpoint at their steps, and checkpoint on SIGTERM or a requested
        pause; True when training pauses here (run.stop_after_steps)."""
        cfg, state = self.cfg, self.state
        eval_due = cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0
        ckpt_due = cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0
        if eval_due:
            self.evaluate(metrics)
        pause = state.step == cfg.run.stop_after_steps
        sigterm = self.ckpt.sigterm_requested()
        more = state.step < self.plan.total_steps and not state.stopped_early
        if (eval_due or ckpt_due or pause or sigterm) and more:
            if sigterm:
                print0(f"SIGTERM: saving a checkpoint at step {state.step} before exiting")
            self.ckpt.save(metrics, now=sigterm or pause)
            self.ckpt.exit_if_signalled()
        self.ckpt.log_uploaded()
        return pause and state.step < self.plan.total_steps


# ------------------------------------------------------------------------ the driver


def run_job(
    cfg: JobConfig,
    address: str | None = None,
    callbacks: list | None = None,
    on_report: Callable[[dict, str | None], None] | None = None,
    **extra,
) -> dict:
    """Validate data, train on Ray, then write the adapter and run.json; returns the run summary.

    `callbacks` go to Ray Train's RunConfig (a sweep passes Tune's report callback to a job on
    workers); a job in this process (scaling.local) calls `on_report(metrics, checkpoint_path)`
    at each of its reports instead. `extra` fields are recorded in run.json (a sweep records its
    name, trial and parameters).
    """
    scratch = scratch_dir()  # a set prepared inline lives here until the run ends
    try:
        init_ray(address)
        cfg = resolve_local_paths(cfg)  # the storage path the data is written under, too
        data = load_data(cfg, scratch)
        preflight_memory(cfg)  # refuses a job that cannot fit, before any worker starts
        result = fit(cfg, data, callbacks or [], on_report)
        return write_outputs(cfg, data, result, scratch, extra)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def scratch_dir() -> str:
    """A temporary directory tagged with this process's id. A sweep trial that Ray Tune stops
    early is killed without running `finally`: the next run removes what dead processes left."""
    for old in Path(tempfile.gettempdir()).glob("rayft-data-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"rayft-data-{os.getpid()}-")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def load_data(cfg: JobConfig, scratch: str):
    """The prepared set for the job's objective, checked before any worker starts."""
    data = load_for_job(cfg, load_tokenizer(cfg.model), scratch)
    for line in summary_lines(data):
        print(line)
    plan_steps(len(data.train), cfg)  # fail here, not on a worker
    if cfg.train.strategy == "deepspeed":
        deepspeed_config(cfg, cfg.scaling.num_workers)  # a bad user JSON fails here too
    return data


def fit(cfg: JobConfig, data, callbacks: list, on_report=None):
    """Run train_func on Ray Train workers; the result of a run that saved its final checkpoint."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    # Ray Train's local mode runs no controller, so it calls no callback: a job in this process
    # reports through on_report, which the train function is given as it is (nothing is pickled)
    if cfg.scaling.local and callbacks:
        raise ConfigError("scaling.local: a job in this process calls no Ray Train callback")
    if on_report and not cfg.scaling.local:
        raise ValueError("on_report is for a job in this process (scaling.local)")
    run_dir = storage.join(cfg.checkpoint.storage_path, cfg.run.name)
    storage_path, storage_fs = storage.ray_storage(cfg.checkpoint.storage_path)
    print(f"run directory: {run_dir}")
    scaling = cfg.scaling
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "job": cfg.model_dump(),
            "data": data.for_workers(),  # where the splits lie on storage, not their rows
            "run_info": tracking_run_info(cfg, data.dataset_hash),
            **({"on_report": on_report} if on_report else {}),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=0 if scaling.local else scaling.num_workers,  # 0: Ray's local mode
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker},
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            callbacks=callbacks,
        ),
    )
    threads = torch.get_num_threads()
    try:
        result = trainer.fit()
    finally:
        torch.set_num_threads(threads)  # a job in this process (scaling.local) set its own
    if scaling.local:  # reported to nothing (Ray's local mode refuses it in a Tune trial)
        result.checkpoint = stored_checkpoint(cfg)
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint in {run_dir}")
    return result


def write_outputs(cfg: JobConfig, data, result, scratch: str, extra: dict) -> dict:
    """The adapter (LoRA) or consolidated model (full fine-tune, final checkpoint only), the
    data's manifest and run.json, in the run directory. For s3:// storage everything is written
    locally first and uploaded with run.json last: a run.json that exists describes outputs
    that are all there."""
    run_dir = storage.join(cfg.checkpoint.storage_path, cfg.run.name)
    kind = "adapter" if cfg.lora is not None else "model"
    local_dir = Path(scratch) / "run" if storage.is_remote(run_dir) else Path(run_dir)
    with result.checkpoint.as_directory() as ckpt_dir:
        state = read_trainer_state(Path(ckpt_dir))
        if (Path(ckpt_dir) / kind).is_dir():
            shutil.rmtree(local_dir / kind, ignore_errors=True)
            shutil.copytree(Path(ckpt_dir) / kind, local_dir / kind)
    summary = run_summary(cfg, data, state, result, f"{run_dir}/{kind}", extra)
    keep_data_report(cfg.data.prepared or scratch, local_dir / "data")
    objective_class(cfg).write_artifacts(summary, local_dir)  # e.g. GRPO's reward curve
    publish_run(local_dir, run_dir, summary)
    if state.completed:  # the token ids the workers read; a paused run resumes from them
        remove(tokens_dir(cfg))
    return summary


def publish_run(local_dir: Path, run_dir: str, summary: dict) -> None:
    """The run directory's files, then run.json last: its presence means the run is complete
    (for s3://, everything is uploaded from the local copy first)."""
    if storage.is_remote(run_dir):
        storage.put_dir(local_dir, run_dir)
        with tempfile.TemporaryDirectory() as tmp:
            write_run_manifest(Path(tmp) / "run.json", **summary)
            storage.put_dir(tmp, run_dir)
    else:
        write_run_manifest(local_dir / "run.json", **summary)


def run_summary(cfg: JobConfig, data, state: TrainerState, result, out: str, extra: dict) -> dict:
    """run.json's fields: what was trained, from what data, how the run went, and its history."""
    lora = cfg.lora is not None
    return {
        "run_name": cfg.run.name,
        "status": "completed" if state.completed else f"paused at step {state.step}",
        "adapter": out if lora else None,
        "model": None if lora else out,
        "method": "lora" if lora else "full",
        "objective": cfg.train.method,  # sft, dpo or grpo
        "strategy": cfg.train.strategy,
        "base_model": cfg.model.name_or_path,
        "dataset_hash": data.dataset_hash,
        "data_report": data.report,
        "metrics": state.final_metrics,
        "steps": state.step,
        "stopped_early": state.stopped_early,
        "resumed_at_steps": state.resumed_at,
        "skipped_checkpoints": state.skipped_checkpoints,
        "worker_nodes": state.worker_nodes,
        "worker_peak_rss_mb": state.worker_peak_rss_mb,
        "seed": cfg.run.seed,
        "checkpoint": result.checkpoint.path,
        "config": cfg.model_dump(),
        **extra,
        "loss_history": state.history,
        "eval_history": state.evals,
    }


def resolve_local_paths(cfg: JobConfig) -> JobConfig:
    """Relative paths made absolute where every process of the job finds them.

    Outside a Ray job's working_dir the workers do not share the driver's working directory, so a
    local model path becomes absolute. Inside one (`ray job submit --working-dir .`) the working
    directory is a temporary copy of the repo that Ray deletes later, so a relative storage path
    goes under the home directory instead: checkpoints and the adapter outlive the job.
    """
    import ray

    in_working_dir = bool(ray.get_runtime_context().runtime_env.get("working_dir"))
    cfg = cfg.model_copy(deep=True)
    model = Path(cfg.model.name_or_path).expanduser()
    if not in_working_dir and model.exists():
        cfg.model.name_or_path = str(model.resolve())
    start = cfg.lora and cfg.lora.init_from and Path(cfg.lora.init_from).expanduser()
    if start and not in_working_dir and start.exists():
        cfg.lora.init_from = str(start.resolve())
    if storage.is_remote(cfg.checkpoint.storage_path):
        return cfg
    local = Path(cfg.checkpoint.storage_path).expanduser()
    if not local.is_absolute():
        local = Path.home() / local if in_working_dir else local.resolve()
    cfg.checkpoint.storage_path = str(local)
    return cfg


def keep_data_report(prepared: str, dest: Path) -> None:
    """The prepared set's manifest and dropped rows stay with the run (not the rows): lineage."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.json", "dropped.jsonl"):
        if storage.exists(storage.join(prepared, name)):
            storage.get_file(storage.join(prepared, name), dest / name)


def print_summary(cfg: JobConfig, summary: dict) -> None:
    if not summary["metrics"]:
        print(f"{summary['run_name']}: {summary['status']}; run the same command again to continue")
        return
    objective_class(cfg).print_summary(summary)


def main(
    config: Annotated[Path, typer.Argument(help="job YAML, e.g. configs/quickstart.yaml")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides: train.lr=1e-4 lora.r=16")
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to join (default: RAY_ADDRESS, else a local one)"),
    ] = None,
) -> None:
    """Fine-tune a LoRA adapter as CONFIG describes."""
    cfg = load_config(config, overrides or [])
    try:
        summary = run_job(cfg, address)
    except ConfigError:
        raise
    except Exception as e:  # the cause goes on the last line, for `ray job submit` and CI logs
        shutdown_ray()  # flushes the workers' streamed logs before our last line
        cli.fail(f"training failed: {last_cause(e)}", code=1)
    print_summary(cfg, summary)


def last_cause(e: BaseException) -> str:
    """`Type: last line of the message` of the innermost cause: what a log's last line should say."""
    while e.__cause__ is not None:
        e = e.__cause__
    message = str(e).strip()
    return f"{type(e).__name__}: {message.splitlines()[-1] if message else ''}"


if __name__ == "__main__":
    cli.run(main)
