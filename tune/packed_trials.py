"""Packed sweeps (`sweep.pack_trials: N`): N trials train at once on one copy of the base model.

One Ray actor, the pack host, loads the base model and the data once and trains up to N
trials' adapters in joint steps (jobs/packed_trials.py). Each Tune trial is a thin function trainable
(0.01 CPU) that joins the host with its values, asks it for its next report (the trial's next
eval, or its end) and passes each to `tune.report`, so ASHA judges packed trials as it judges
normal ones. Between a report and the trial's next request only that trial's slot waits;
the others keep training. A trial that ends, is stopped by ASHA or dies frees its slot for the
next trial Tune starts. A finished trial writes the same run directory as a normal one
(SWEEP_DIR/runs/NAME-TRIAL: adapter/, data/, run.json), which promotion reads.

Packed trials keep no checkpoints: a sweep resumed by `Tuner.restore` keeps its finished trials
and restarts the unfinished ones from step 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ray

from jobs.config import JobConfig, load_config
from jobs.packed_trials import PackedTrainer, check_packable

log = logging.getLogger("rayft.packed")
TRIAL_CPUS = 0.01  # a trial only waits on the host (Tune rejects 0)


def packed_trainable(cfg, job: JobConfig, sweep: dict[str, Any]):
    """The Tune trainable of a packed sweep, the trial function bound to a new pack host sized
    for cfg.pack_trials trials, and that host (the caller kills it when the sweep is over).
    Unpackable sweeps fail here, before any trial starts."""
    from ray import tune

    check_packable(job, cfg.space, where=f"{cfg.job} (sweep {cfg.name})")
    scaling = job.scaling
    # the trials' CPUs come out of the host's share: a packed sweep fits where one job does
    host_cpus = max(scaling.cpus_per_worker - TRIAL_CPUS * cfg.pack_trials, TRIAL_CPUS)
    host = PackHost.options(
        num_cpus=host_cpus,
        num_gpus=1 if scaling.use_gpu else 0,
        resources=scaling.resources_per_worker,
    ).remote(sweep, cfg.pack_trials)
    trainable = tune.with_resources(
        tune.with_parameters(packed_trial, host=host, sweep=sweep),
        {"cpu": TRIAL_CPUS},  # the host holds the CPUs
    )
    return trainable, host


def trial_config(sweep: dict[str, Any], params: dict[str, Any], trial: str | None) -> JobConfig:
    """The job of one trial (as tune.sweep.run_trial builds it), or the sweep's shared job."""
    overrides = [*sweep["overrides"], *(f"{k}={v}" for k, v in params.items())]
    if trial is not None:
        overrides += [
            f"run.name={sweep['name']}-{trial}",
            f"checkpoint.storage_path={sweep['runs']}",
        ]
    return load_config(sweep["job"], overrides)


# ---------------------------------------------------------------- the trial


@ray.remote(num_cpus=0)
class Lease:
    """Made by a trial, so fate-shared with it: when the trial's process dies (Tune kills a
    stopped trial's actor), this actor dies too and the host's pending `held` call fails."""

    async def held(self) -> None:
        await asyncio.Event().wait()


def packed_trial(params: dict[str, Any], host, sweep: dict[str, Any]) -> None:
    """A Tune function trainable: one slot of the host, reporting each eval and the end."""
    from ray import tune

    trial = tune.get_context().get_trial_id()
    lease = Lease.remote()
    try:
        ray.get(host.join.remote(trial, params, lease))
        while True:
            metrics, finished = ray.get(host.advance.remote(trial))
            tune.report(metrics)  # ASHA may stop the trial here (SystemExit: finally runs)
            if finished:
                return
    finally:
        host.leave.remote(trial)
        ray.kill(lease)


# ---------------------------------------------------------------- the host


@ray.remote
class PackHost:
    """The base model, the data and up to `capacity` trials' slots. Torch work runs on one
    thread, off the event loop, so that joins, leaves and requests are answered meanwhile."""

    def __init__(self, sweep: dict[str, Any], capacity: int):
        if Path(sweep["cwd"]).is_dir():  # relative paths in the job mean the sweep's directory
            os.chdir(sweep["cwd"])
        self.sweep, self.capacity = sweep, capacity
        self.trainer, self.data, self.scratch = load_host(trial_config(sweep, {}, None))
        self.pool = ThreadPoolExecutor(1)
        self.members: dict[str, dict[str, Any]] = {}  # trial -> its config, params, meter
        self.waiting: dict[str, asyncio.Future] = {}  # trials whose next report is due
        self.loop_task: asyncio.Task | None = None
        self.freed: asyncio.Condition | None = None  # made in the actor's event loop

    async def _torch(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args))

    async def join(self, trial: str, params: dict[str, Any], lease) -> None:
        """Takes a slot for the trial, waiting until one is free."""
        from jobs.finetune import Throughput, resolve_local_paths

        self.freed = self.freed or asyncio.Condition()
        async with self.freed:
            await self.freed.wait_for(lambda: len(self.members) < self.capacity)
            cfg = resolve_local_paths(trial_config(self.sweep, params, trial))
            self.members[trial] = {"cfg": cfg, "params": params, "meter": Throughput()}
            for member in self.members.values():  # how many trials each trained beside, at most
                member["peak_slots"] = max(member.get("peak_slots", 0), len(self.members))
        try:
            await self._torch(self.trainer.add, trial, cfg)
        except BaseException:
            await self.leave(trial)
            raise
        asyncio.ensure_future(self._watch(trial, lease))
        print(f"pack host: trial {trial} joined ({len(self.members)}/{self.capacity} slots)")

    async def _watch(self, trial: str, lease) -> None:
        with contextlib.suppress(ray.exceptions.RayActorError):  # the trial left, or died
            await lease.held.remote()
        await self.leave(trial)

    async def leave(self, trial: str) -> None:
        """Frees the trial's slot (idempotent: the trial, its lease and the end all call it)."""
        if self.members.pop(trial, None) is None:
            return
        request = self.waiting.pop(trial, None)
        if request is not None and not request.done():
            request.cancel()
        await self._torch(self.trainer.remove, trial)
        async with self.freed:
            self.freed.notify_all()

    async def advance(self, trial: str) -> tuple[dict[str, Any], bool]:
        """Trains the trial's slot to its next eval (or end): (metrics to report, finished)."""
        if trial not in self.members:
            raise RuntimeError(f"trial {trial} holds no slot of the pack host")
        request = asyncio.get_running_loop().create_future()
        self.waiting[trial] = request
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.ensure_future(self._train())
        return await request

    async def _train(self) -> None:
        """Joint steps of every slot whose trial waits for a report, until none waits."""
        while self.waiting:
            # a snapshot: a trial leaving during the step must not change what the step reads
            members = {t: self.members[t] for t in self.waiting if t in self.members}
            try:
                reports = await self._torch(self._step, members)
            except Exception as e:  # every waiting trial fails with the cause, not a hang
                for request in self.waiting.values():
                    if not request.done():
                        request.set_exception(e)
                self.waiting.clear()
                return
            for trial, report in reports.items():
                request = self.waiting.get(trial)
                if report is None or request is None:
                    continue
                del self.waiting[trial]
                request.set_result(report)
                if report[1]:  # finished: its outputs are written, the slot is free now
                    await self.leave(trial)

    def _step(self, members: dict[str, dict]) -> dict[str, tuple[dict, bool] | None]:
        """One joint step; the reports it makes due (on the torch thread)."""
        trainer = self.trainer
        trials = [t for t in members if t in trainer.slots]  # one may have left meanwhile
        start = time.perf_counter()
        results = trainer.train_step(trials)
        seconds = time.perf_counter() - start
        every = trainer.job.eval.every_steps
        reports: dict[str, tuple[dict, bool] | None] = dict.fromkeys(trials)
        for trial, result in results.items():
            members[trial]["meter"].add(trainer.slots[trial].state.step, result.tokens, seconds)
        due = [t for t in trials if every and trainer.slots[t].state.step % every == 0]
        for trial, loss in (trainer.eval_losses(due) if due else {}).items():
            step = trainer.slots[trial].state.step
            trainer.record_eval(trial, loss)
            print(f"pack host: trial {trial} step {step}: eval loss {loss:.4f}")
            reports[trial] = ({"step": step, "eval_loss": loss}, False)
        for trial in (t for t in trials if trainer.done(t)):
            final = trainer.final_metrics(trial, members[trial]["meter"].rate())
            self._write_run(trial, members[trial])
            reports[trial] = (final, True)
        return reports

    def _write_run(self, trial: str, member: dict) -> None:
        member = {**member, "slots": self.capacity}
        write_run(self.trainer, trial, member, self.data, self.scratch, self.sweep)


def load_host(job: JobConfig) -> tuple[PackedTrainer, Any, str]:
    """The base model and the prepared data, once for every trial: (trainer, data, scratch)."""
    import torch

    from inference.model import load_base_model, load_tokenizer
    from jobs.finetune import load_data, resolve_local_paths, scratch_dir
    from jobs.parallel import job_runtime

    scratch = scratch_dir()  # a set prepared inline lives here while the host lives
    job = resolve_local_paths(job)  # the storage path the data is written under, too
    data = load_data(job, scratch)
    device = torch.device("cuda" if job.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))
    rt = job_runtime(job, device)
    base = load_base_model(job.model, device)
    trainer = PackedTrainer(job, rt, load_tokenizer(job.model), base, data.for_workers())
    return trainer, data, scratch


def write_run(trainer: PackedTrainer, trial: str, member: dict, data, scratch: str, sweep) -> None:
    """The finished trial's run directory as the normal job writes it: adapter/, data/, then
    run.json last (for s3:// everything is uploaded from a local copy, run.json last)."""
    from core import storage
    from jobs.finetune import keep_data_report, publish_run, run_summary

    cfg, state = member["cfg"], trainer.slots[trial].state
    state.worker_nodes = [ray.get_runtime_context().get_node_id()]
    state.worker_peak_rss_mb = [round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)]
    run_dir = storage.join(cfg.checkpoint.storage_path, cfg.run.name)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) if storage.is_remote(run_dir) else Path(run_dir)
        trainer.save_adapter(trial, local / "adapter")
        keep_data_report(cfg.data.prepared or scratch, local / "data")
        no_checkpoint = SimpleNamespace(checkpoint=SimpleNamespace(path=None))
        extra = {"sweep": {"name": sweep["name"], "trial": trial, "params": member["params"]}}
        summary = run_summary(cfg, data, state, no_checkpoint, f"{run_dir}/adapter", extra)
        summary["packed"] = {
            "host": ray.get_runtime_context().get_actor_id(),
            "slots": member["slots"],
            "peak_slots_used": member["peak_slots"],  # trials training at once beside this one
        }
        publish_run(Path(local), run_dir, summary)
