"""The LoRA fine-tuning job: a JSONL file in, an evaluated peft adapter out.

    python -m jobs.finetune configs/quickstart.yaml [key.sub=value ...]
    ray job submit --working-dir . -- python -m jobs.finetune configs/quickstart.yaml

The driver (`main`) validates the config and the data before any worker starts, then runs
`train_func` on Ray Train workers. `train_func` reads top to bottom: setup, resume, the loop,
the final evaluation (base vs adapter) and the final save. Re-running with the same run.name
resumes from the newest checkpoint in STORAGE_PATH/RUN_NAME.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated

import torch
import typer
from transformers import get_cosine_schedule_with_warmup

from jobs import storage
from jobs.batching import collate, collate_pairs, epoch_order, pack, step_micro_batches
from jobs.checkpointing import (
    TrainerState,
    checkpoint_step,
    load_checkpoint,
    newest_complete_checkpoint,
    read_trainer_state,
    save_checkpoint,
    write_commit_marker,
)
from jobs.config import ConfigError, JobConfig, load_config
from jobs.data import load_for_job, summary_lines
from jobs.distributed import (
    all_gather_objects,
    all_reduce_sum,
    init_ray,
    rank_and_world,
    seed_everything,
    shutdown_ray,
)
from jobs.durable import Preemption, Uploader
from jobs.evaluation import eval_loss, exact_match, perplexity, token_loss_sum
from jobs.manifest import write_run_manifest
from jobs.memory import preflight_memory
from jobs.model import add_lora, enable_gradient_checkpointing, load_base_model, load_tokenizer
from jobs.parallel import Parallel, deepspeed_config, make_parallel
from jobs.preference import dpo_train_step, preference_metrics
from jobs.tracking import start_tracker, tracking_run_info

logger = logging.getLogger(__name__)


def print0(message: str) -> None:
    """Progress lines from rank 0. Through logging: Ray Train routes it to the driver once, while
    its patched print() echoes twice when a library has wrapped sys.stdout."""
    if rank_and_world()[0] == 0:
        logger.info(message)


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
    return StepPlan(steps_per_epoch, total, math.ceil(cfg.train.warmup_ratio * total))


def autocast_for(cfg: JobConfig, device: torch.device):
    """bf16/fp16 autocast on GPU (precision=auto picks bf16 where supported); fp32 otherwise."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def train_step(par: Parallel, micro_batches, device, autocast, max_grad_norm) -> tuple[float, int]:
    """One optimizer step over this rank's micro-batches (gradient accumulation); returns the
    step's loss and its non-padding input tokens, both over all ranks.

    The loss is the mean over every label token in the step on every rank, so accumulation and
    data parallelism give the same gradient as one big batch (not a mean of micro-batch means).
    """
    _, world = rank_and_world()
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    (global_tokens,) = all_reduce_sum([local_tokens], device)
    loss_sum = 0.0
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            loss, _ = token_loss_sum(par.model, batch)
        # every strategy averages gradients over ranks; scaling by world undoes that average
        par.backward(loss * world / global_tokens, last=i == len(micro_batches) - 1)
        loss_sum += loss.item()
    par.step(max_grad_norm)
    local_inputs = sum(int(b["attention_mask"].sum()) for b in micro_batches)
    total_loss, inputs = all_reduce_sum([loss_sum, local_inputs], device)
    return total_loss / global_tokens, int(inputs)


def held_out_metrics(par: Parallel, cfg, tokenizer, examples, convs, device, autocast) -> dict:
    """Loss, perplexity and (if asked) exact match of the model as it is now; for DPO the
    preference loss, reward margin and accuracy on the held-out pairs."""
    pad_id, lockstep = tokenizer.pad_token_id, par.collective_forward
    if cfg.train.method == "dpo":
        bs, dpo = cfg.eval.batch_size, cfg.train.dpo
        return preference_metrics(par, examples, bs, pad_id, device, autocast, dpo)
    loss = eval_loss(par.module, examples, cfg.eval.batch_size, pad_id, device, autocast, lockstep)
    metrics = {"eval_loss": loss, "eval_ppl": perplexity(loss)}
    gen_convs = convs[: cfg.eval.max_generate_samples]
    if cfg.eval.task_metric == "exact_match" and gen_convs:
        metrics["exact_match"] = exact_match(
            par.module,
            tokenizer,
            gen_convs,
            cfg.eval.max_new_tokens,
            cfg.eval.batch_size,
            device,
            autocast,
            lockstep,
        )
    return metrics


# ------------------------------------------------------------------------ the train function


def train_func(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg = JobConfig.model_validate(config["job"])
    data = config["data"]
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)
    train_examples, eval_examples, eval_convs = (
        data["train"],
        data["eval"],
        data["eval_conversations"],
    )

    # --- setup: device, threads, seeds, model, how it is spread over the workers
    rank, world = rank_and_world()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    autocast = autocast_for(cfg, device)
    seed_everything(cfg.run.seed)  # identical LoRA init on every rank
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model, device)
    if cfg.lora is not None:
        model = add_lora(model, cfg.lora)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    seed_everything(cfg.run.seed + rank)  # distinct dropout masks per rank
    plan = plan_steps(len(train_examples), cfg)
    par = make_parallel(cfg, device)
    par.setup(
        model,
        lambda params: torch.optim.AdamW(
            params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        ),
        lambda opt: get_cosine_schedule_with_warmup(opt, plan.warmup_steps, plan.total_steps),
    )

    # --- resume: the newest complete checkpoint of this run name, if any; torn ones are skipped
    # (a step's examples do not depend on the worker count, so a resume may change it)
    state = TrainerState()
    checkpoint, torn = resume_checkpoint()
    for t in torn:
        print0(f"WARNING: skipping torn checkpoint {t['checkpoint']}: {t['reason']}")
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_checkpoint(Path(ckpt_dir), par, rank)
        state.resumed_at.append(state.step)
        print0(f"resumed from {checkpoint.path} at step {state.step}/{plan.total_steps}")
    state.skipped_checkpoints += torn
    if state.completed:
        print0("this run already finished; nothing to train")
        ray.train.report({"step": state.step, **state.final_metrics})
        return
    # rank 0 only; finished on the way out, marked failed when the train function raises
    with start_tracker(cfg, config["run_info"], plan.total_steps) as tracker:
        uploader = Uploader(
            cfg.checkpoint.upload_retry_s,
            cfg.checkpoint.max_pending_uploads,
            log=lambda message: print(f"[rank {rank}] {message}", flush=True),
        )
        preemption = Preemption(cfg.checkpoint.save_on_sigterm)

        def report(metrics: dict, final: bool = False, now: bool = False) -> None:
            # ray.train.report costs about a second on a small machine: only at eval/checkpoint steps.
            # The upload runs in the background (storage may be down) unless this is the final
            # checkpoint or one before exiting.
            staged = uploader.stage()
            try:
                save_checkpoint(staged, par, tokenizer, state, rank, final=final)
                write_commit_marker(staged, rank, world, state.step)
            except BaseException:
                uploader.unstage(staged)
                raise
            mode = ray.train.CheckpointUploadMode
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(staged)),
                checkpoint_dir_name=f"checkpoint_{state.step:06d}" + ("_final" if final else ""),
                checkpoint_upload_mode=mode.SYNC if final or now else mode.ASYNC,
                checkpoint_upload_fn=uploader.upload,
                delete_local_checkpoint_after_upload=False,  # the uploader removes it, on any outcome
            )

        def log_uploaded() -> None:  # a checkpoint is logged as saved once it is in storage
            while uploader.saved:
                name = uploader.saved.pop(0)
                tracker.log_checkpoint(
                    f"{cfg.checkpoint.storage_path}/{cfg.run.name}/{name}", checkpoint_step(name)
                )

        state.worker_nodes = all_gather_objects(ray.get_runtime_context().get_node_id())
        pad_id = tokenizer.pad_token_id
        dpo = cfg.train.method == "dpo"
        if dpo:
            batch_of = partial(collate_pairs, pad_id=pad_id)
        elif cfg.train.packing:
            batch_of = partial(pack, max_len=cfg.data.max_seq_len, pad_id=pad_id)
        else:
            batch_of = partial(collate, pad_id=pad_id)
        if (
            cfg.lora is None and state.step == 0
        ):  # a full fine-tune has no base to compare with later
            print0("evaluating the base model before training")
            state.base_metrics = held_out_metrics(
                par, cfg, tokenizer, eval_examples, eval_convs, device, autocast
            )
        par.model.train()
        print0(
            f"training {plan.total_steps} steps ({plan.steps_per_epoch}/epoch) on {world} worker(s) "
            f"with {cfg.train.strategy}, {cfg.grad_accum_steps} accumulation step(s) of "
            f"{cfg.train.micro_batch_size} per worker, device {device}"
        )

        # --- the loop
        tokens_since, time_since, order, current_epoch = 0, 0.0, [], -1
        while state.step < plan.total_steps and not state.stopped_early:
            epoch, k = divmod(state.step, plan.steps_per_epoch)
            if (
                epoch != current_epoch
            ):  # the order is a function of (seed, epoch): resume continues it
                order, current_epoch = epoch_order(len(train_examples), cfg.run.seed, epoch), epoch
            micro = [
                batch_of([train_examples[j] for j in idx])
                for idx in step_micro_batches(
                    order,
                    k,
                    cfg.train.effective_batch_size,
                    rank,
                    world,
                    cfg.train.micro_batch_size,
                )
            ]

            t0 = time.perf_counter()
            extra = {}  # DPO: rewards, margin and accuracy of the step's pairs
            if dpo:
                extra, tokens = dpo_train_step(
                    par, micro, device, autocast, cfg.train.max_grad_norm, cfg.train.dpo
                )
                loss = extra.pop("loss")
            else:
                loss, tokens = train_step(par, micro, device, autocast, cfg.train.max_grad_norm)
            state.step += 1
            state.history.append(
                {"step": state.step, "loss": loss, "lr": par.last_lr(), "epoch": epoch, **extra}
            )
            if state.step > 1:  # the first step pays one-off costs (allocations, lazy init)
                time_since += time.perf_counter() - t0
                tokens_since += tokens

            if state.step % cfg.train.log_every_steps == 0 or state.step == plan.total_steps:
                tps = tokens_since / time_since if time_since else 0.0
                shown = "".join(
                    f" | {k} {extra[k]:.3f}" for k in ("margin", "accuracy") if k in extra
                )
                print0(
                    f"step {state.step}/{plan.total_steps} | loss {loss:.4f}{shown} | lr {par.last_lr():.2e} | {tps:,.0f} tok/s"
                )
                tracker.log(
                    {"train/loss": loss, "train/lr": par.last_lr(), "train/tokens_per_s": tps}
                    | {f"train/{TRACKED.get(k, k)}": v for k, v in extra.items()},
                    state.step,
                )

            metrics = {
                "step": state.step,
                "loss": loss,
                "train_tokens_per_s": tokens_since / max(time_since, 1e-9),
            }
            eval_due = cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0
            ckpt_due = cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0
            if eval_due:
                pairs = {}  # DPO: the held-out margin, accuracy and rewards besides the loss
                if dpo:
                    pairs = held_out_metrics(
                        par, cfg, tokenizer, eval_examples, [], device, autocast
                    )
                    metrics["eval_loss"] = pairs.pop("eval_loss")
                else:
                    metrics["eval_loss"] = eval_loss(
                        par.module,
                        eval_examples,
                        cfg.eval.batch_size,
                        pad_id,
                        device,
                        autocast,
                        par.collective_forward,
                    )
                improved = state.record_eval(state.step, metrics["eval_loss"])
                state.evals[-1].update(pairs)
                metrics |= pairs
                tracker.log(
                    {"eval/loss": metrics["eval_loss"]}
                    | {f"eval/{TRACKED.get(k[5:], k[5:])}": v for k, v in pairs.items()},
                    state.step,
                )
                print0(
                    f"eval at step {state.step}: loss {metrics['eval_loss']:.4f}"
                    + (" (best)" if improved else "")
                )
                patience = cfg.eval.early_stopping_patience
                if patience and state.evals_without_improvement >= patience:
                    state.stopped_early = True
                    print0(f"early stop: eval loss has not improved for {patience} evals")
            pause = state.step == cfg.run.stop_after_steps
            sigterm = preemption.requested(world)  # a spot node going away: save now
            if (
                (eval_due or ckpt_due or pause or sigterm)
                and state.step < plan.total_steps
                and not state.stopped_early
            ):
                if sigterm:
                    print0(f"SIGTERM: saving a checkpoint at step {state.step} before exiting")
                report(metrics, now=sigterm or pause)
                preemption.exit_if_signalled()
            log_uploaded()
            if pause and state.step < plan.total_steps:
                print0(
                    f"stopping after step {state.step} (run.stop_after_steps); run again to continue"
                )
                preemption.close()
                return

        # --- final evaluation: the same held-out set with the adapter and without it (the base)
        print0("final evaluation: base vs fine-tuned on the held-out set")
        final = {"step": state.step, "train_tokens_per_s": tokens_since / max(time_since, 1e-9)}
        base = state.base_metrics
        if cfg.lora is not None and not dpo:  # DPO's base is its reference: margin 0 by definition
            with par.adapter_disabled():
                base = held_out_metrics(
                    par, cfg, tokenizer, eval_examples, eval_convs, device, autocast
                )
        final |= {f"base_{k}": v for k, v in base.items()}
        final |= held_out_metrics(par, cfg, tokenizer, eval_examples, eval_convs, device, autocast)
        state.completed, state.final_metrics = True, final
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        state.worker_peak_rss_mb = all_gather_objects(round(peak_rss_mb, 1))
        report(final, final=True)
        log_uploaded()
        tracker.summary(final)
        preemption.exit_if_signalled()
        preemption.close()


def resume_checkpoint():
    """(the newest complete checkpoint in this run's storage or None, the torn ones skipped).

    Looks at storage itself, not only at Ray's record of registered checkpoints: after a driver
    is killed and the run resubmitted, what is in storage is what counts."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    fs = storage.storage_filesystem
    path, torn = newest_complete_checkpoint(fs, storage.experiment_fs_path)
    return (ray.train.Checkpoint(path=path, filesystem=fs) if path else None), torn


# ------------------------------------------------------------------------ the driver


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
    if storage.is_remote(cfg.checkpoint.storage_path):
        return cfg
    local = Path(cfg.checkpoint.storage_path).expanduser()
    if not local.is_absolute():
        local = Path.home() / local if in_working_dir else local.resolve()
    cfg.checkpoint.storage_path = str(local)
    return cfg


# DPO metric names as TRL logs them (train/rewards/margins, ...)
TRACKED = {"rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
           "margin": "rewards/margins", "accuracy": "rewards/accuracies"}  # fmt: skip


def run_job(
    cfg: JobConfig, address: str | None = None, callbacks: list | None = None, **extra
) -> dict:
    """Validate data, train on Ray, then write the adapter and run.json; returns the run summary.

    `callbacks` go to Ray Train's RunConfig (a sweep passes Tune's report callback); `extra`
    fields are recorded in run.json (a sweep records its name, trial and parameters).
    """
    inline = tempfile.mkdtemp(prefix="rayft-data-")  # an inline-prepared set, until the run ends
    try:
        return _run_job(cfg, address, inline, callbacks or [], extra)
    finally:
        shutil.rmtree(inline, ignore_errors=True)


def _run_job(cfg: JobConfig, address, inline: str, callbacks: list, extra: dict) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    tokenizer = load_tokenizer(cfg.model)
    data = load_for_job(cfg, tokenizer, inline)
    report = data.report
    for line in summary_lines(data):
        print(line)
    plan_steps(len(data.train), cfg)  # fail here, not on a worker
    if cfg.train.strategy == "deepspeed":
        deepspeed_config(cfg, cfg.scaling.num_workers)  # a bad user JSON fails here too

    init_ray(address)
    preflight_memory(cfg)  # refuses a job that cannot fit, before any worker starts
    cfg = resolve_local_paths(cfg)
    run_dir = f"{cfg.checkpoint.storage_path.rstrip('/')}/{cfg.run.name}"
    storage_path, storage_fs = storage.ray_storage(cfg.checkpoint.storage_path)
    print(f"run directory: {run_dir}")
    payload = {
        "train": data.train,
        "eval": data.eval,
        "eval_conversations": data.eval_conversations,
    }
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "job": cfg.model_dump(),
            "data": ray.put(payload),
            "run_info": tracking_run_info(cfg, data.dataset_hash),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint in {run_dir}")

    # LoRA: the adapter; full fine-tune: the consolidated model (in the final checkpoint only).
    # Written to a local directory first; for s3:// storage uploaded with run.json last, so a
    # run.json that exists describes outputs that are all there.
    kind = "adapter" if cfg.lora is not None else "model"
    local_dir = Path(run_dir) if not storage.is_remote(run_dir) else Path(inline) / "run"
    out_dir = local_dir / kind
    with result.checkpoint.as_directory() as ckpt_dir:
        state = read_trainer_state(Path(ckpt_dir))
        if (Path(ckpt_dir) / kind).is_dir():
            if out_dir.exists():
                shutil.rmtree(out_dir)
            shutil.copytree(Path(ckpt_dir) / kind, out_dir)
    summary = {
        "run_name": cfg.run.name,
        "status": "completed" if state.completed else f"paused at step {state.step}",
        "adapter": f"{run_dir}/{kind}" if kind == "adapter" else None,
        "model": f"{run_dir}/{kind}" if kind == "model" else None,
        "method": "lora" if cfg.lora is not None else "full",
        "objective": cfg.train.method,  # sft or dpo
        "strategy": cfg.train.strategy,
        "base_model": cfg.model.name_or_path,
        "dataset_hash": data.dataset_hash,
        "data_report": report,
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
    keep_data_report(cfg.data.prepared or inline, local_dir / "data")
    if storage.is_remote(run_dir):
        storage.put_dir(local_dir, run_dir)
        with tempfile.TemporaryDirectory() as tmp:
            write_run_manifest(Path(tmp) / "run.json", **summary)
            storage.put_dir(Path(tmp), run_dir)
    else:
        write_run_manifest(local_dir / "run.json", **summary)
    return summary


def keep_data_report(prepared: str, dest: Path) -> None:
    """The prepared set's manifest and dropped rows stay with the run (not the rows): lineage."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.json", "dropped.jsonl"):
        if storage.exists(storage.join(prepared, name)):
            storage.get_file(storage.join(prepared, name), dest / name)


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = summary["metrics"]
    if not m:
        print(f"{summary['run_name']}: {summary['status']}; run the same command again to continue")
        return
    if "eval_margin" in m:  # DPO: the reference (base) has margin 0 and accuracy 0 by definition
        print(
            f"held-out pairs ({summary['run_name']}, {summary['steps']} steps): DPO loss "
            f"{m['eval_loss']:.4f}, reward margin {m['eval_margin']:.3f}, accuracy "
            f"{m['eval_accuracy']:.1%} (chosen {m['eval_rewards_chosen']:.3f}, rejected "
            f"{m['eval_rewards_rejected']:.3f})\nadapter: {summary['adapter']}"
        )
        return
    table = Table(title=f"held-out evaluation ({summary['run_name']}, {summary['steps']} steps)")
    table.add_column("model")
    for col in ("eval loss", "perplexity", "exact match"):
        table.add_column(col, justify="right")
    tuned = "base + adapter" if summary["adapter"] else "fine-tuned"
    for name, prefix in (("base", "base_"), (tuned, "")):
        em = m.get(f"{prefix}exact_match")
        table.add_row(
            name,
            f"{m[f'{prefix}eval_loss']:.4f}",
            f"{m[f'{prefix}eval_ppl']:.2f}",
            "-" if em is None else f"{em:.1%}",
        )
    console = Console()
    console.print(table)
    # plain print: a path must stay whole on one line, whatever the terminal's width
    kind = "adapter" if summary["adapter"] else "model"
    out = summary[kind]
    print(f"{kind}: {out}\nmanifest: {out.rsplit('/', 1)[0]}/run.json")


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
    try:
        cfg = load_config(config, overrides or [])
        summary = run_job(cfg, address)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    except Exception as e:  # the cause goes on the last line, for `ray job submit` and CI logs
        shutdown_ray()  # flushes the workers' streamed logs before our last line
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        print(
            f"error: training failed: {type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}",
            file=sys.stderr,
        )
        raise typer.Exit(1) from None
    print_summary(summary)


if __name__ == "__main__":
    typer.run(main)
