"""Sweep the fine-tuning job with Ray Tune, then evaluate, gate and promote the best trial.

    python -m tune.sweep configs/sweep_reviews.yaml [key=value ...]

A trial is a whole run of the job (`jobs.finetune.run_job`, its own Ray Train workers) inside a
function trainable; Ray Train's `TuneReportCallback` forwards each eval report to Tune, so ASHA
can stop a poor trial at its next eval. A job with `scaling.local: true` trains in the trial's
process instead and reports to Tune itself. Results land in SWEEP_DIR (storage_path/name, a local
directory or s3://bucket/prefix/name that every node of a cluster reaches): results.csv/json,
plots, one run directory per finished trial (run.json, adapter/), and Tune's own experiment
state, which `Tuner.restore` uses to resume an interrupted sweep.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import Field, model_validator

from core import cli
from core.config import ConfigError, Section, apply_overrides, parse_overrides, read_yaml, validate
from core.registry import DEFAULT_ALIAS
from core.storage import exists as url_exists
from core.storage import is_remote, join, open_url, ray_storage
from core.upstream import require
from jobs.config import StoragePath, load_config
from tune.progress import progress_callback
from tune.search import (
    MODEL_BASED,
    asha_rungs,
    num_samples,
    search_algorithm,
    search_space,
    shuffled_grid,
    trial_count,
    trial_scheduler,
)

log = logging.getLogger("rayft.sweep")


# What run_trial sets in every trial's job, after the sweep's overrides and the trial's values.
TRIAL_KEYS = {
    "run.name": "each trial's run is NAME-TRIAL",
    "checkpoint.storage_path": "each trial writes under SWEEP_DIR/runs",
}


class SchedulerConfig(Section):
    # asha: stop trials at their evals; hyperband: BOHB's HyperBand (search: bohb); none: FIFO
    type: Literal["asha", "hyperband", "none"] = "asha"
    metric: str = "eval_loss"  # what the job reports at each eval
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(1, ge=1)  # in evals: a trial always gets this many
    reduction_factor: float = Field(4, gt=1)  # Ray's default; the replay in benchmarks/README.md
    shuffle_grid: bool = True  # a grid under ASHA runs in a seeded shuffled order
    startup_trials: int = Field(4, ge=1)  # optuna: random trials before TPE models the results


class BudgetConfig(Section):
    time_s: float | None = Field(None, gt=0)  # wall time of the whole sweep
    worker_hours: float | None = Field(None, gt=0)  # trials' workers x their wall time, summed
    steps: int | None = Field(None, ge=1)  # training steps of all trials, summed


class PromoteConfig(Section):
    name: str
    alias: str = DEFAULT_ALIAS
    eval: str  # an eval YAML with a gate section (tune.evaluate)
    registry: str = "runs/registry"  # tune.registry's default, which serving reads


class SweepConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    job: str  # the job YAML every trial runs
    overrides: list[str] = []  # applied to the job for every trial (before the swept keys)
    # dotted job key -> {choice: [...]} | {grid: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]}
    space: dict[str, dict[Literal["choice", "grid", "uniform", "loguniform"], list[Any]]]
    search: Literal["random", "grid", "optuna", "bohb"] = "random"
    num_trials: int = Field(4, ge=1)  # random/optuna/bohb: samples; grid: repeats of the grid
    max_concurrent_trials: int = Field(2, ge=1)
    # >1: trials train N at a time in one process on one copy of the base model (tune.packed_trials)
    pack_trials: int = Field(1, ge=1)
    scheduler: SchedulerConfig = SchedulerConfig()
    budget: BudgetConfig = BudgetConfig()
    max_failures: int = Field(1, ge=0)  # an errored trial is retried this many times
    storage_path: StoragePath = "sweeps"  # a local directory or s3://bucket/prefix
    seed: int = 0
    promote: PromoteConfig | None = None

    @model_validator(mode="after")
    def _space_is_sane(self) -> SweepConfig:
        for key, spec in self.space.items():
            if len(spec) != 1:
                raise ValueError(
                    f"space.{key}: give exactly one of choice, grid, uniform, loguniform"
                )
            ((kind, values),) = spec.items()
            if kind in ("uniform", "loguniform") and (len(values) != 2 or values[0] >= values[1]):
                raise ValueError(f"space.{key}.{kind}: expected [low, high] with low < high")
            if kind in ("choice", "grid") and not values:
                raise ValueError(f"space.{key}.{kind}: empty")
            if self.search == "grid" and kind != "grid":
                raise ValueError(f"space.{key}: search: grid needs grid values for every key")
            if self.search in MODEL_BASED and kind == "grid":
                raise ValueError(
                    f"space.{key}: search: {self.search} samples; use choice, not grid"
                )
        if self.pack_trials > 1:  # the pack host's slots are the trials that can run at once
            if "max_concurrent_trials" not in self.model_fields_set:
                self.max_concurrent_trials = self.pack_trials
            elif self.max_concurrent_trials != self.pack_trials:
                raise ValueError(
                    f"max_concurrent_trials: {self.max_concurrent_trials} with pack_trials: "
                    f"{self.pack_trials}; a packed sweep runs as many trials as it packs (leave "
                    "max_concurrent_trials out)"
                )
        if (self.search == "bohb") != (self.scheduler.type == "hyperband"):
            raise ValueError(
                "search: bohb and scheduler.type: hyperband go together (BOHB's model is fit to "
                "HyperBand's brackets, and HyperBand without BOHB is ASHA's job here)"
            )
        for item in self.overrides:  # a trial's own values come after these and win
            key = item.partition("=")[0]
            if swept := overlapping(key, self.space):
                raise ValueError(
                    f"overrides: {item} is overridden by space.{swept}; change the space instead"
                )
            if trial := overlapping(key, TRIAL_KEYS):
                raise ValueError(f"overrides: {item}: set by the sweep ({TRIAL_KEYS[trial]})")
        return self


def overlapping(key: str, keys) -> str | None:
    """The first of `keys` that sets `key`, a key inside it or a section holding it."""
    return next(
        (k for k in keys if k == key or k.startswith(f"{key}.") or key.startswith(f"{k}.")), None
    )


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    require("ray", why=f"{path}: a sweep runs on Ray Tune, reached through core/upstream/ray.py")
    raw, parsed = read_yaml(path), parse_overrides(overrides or [])
    for key, value in parsed.items():
        if key.startswith("job."):  # the job is a file here: its keys go in `overrides`
            raise ConfigError(job_override_error(path, key, value, raw))
    raw = apply_overrides(raw, parsed)
    cfg = validate(SweepConfig, raw, str(path))
    # every trial's job config must load: check one with the first value of each key now
    probe = [f"{k}={_first(v)}" for k, v in cfg.space.items()]
    job = load_config(cfg.job, [*cfg.overrides, *probe])
    if cfg.pack_trials > 1:  # what packed trials cannot vary or use fails here, not on Ray
        from jobs.packed_trials import check_packable

        check_packable(job, cfg.space, where=f"{path}: {cfg.job} (pack_trials)")
    return cfg


def job_override_error(path, key: str, value: Any, raw: dict[str, Any]) -> str:
    job_key = key.removeprefix("job.")
    if swept := overlapping(job_key, raw.get("space") or {}):
        return f"{path}: {key}={value} is overridden by space.{swept}; change the space instead"
    return (
        f"{path}: {key}: the sweep's job is the file {raw.get('job')}; add {job_key}=VALUE to "
        "the sweep's overrides (what every trial's job gets)"
    )


def _first(spec: dict[str, list[Any]]) -> Any:
    ((kind, values),) = spec.items()
    return values[0]


# ---------------------------------------------------------------- one trial


def run_trial(params: dict[str, Any], sweep: dict[str, Any]) -> None:
    """A Tune function trainable: the job with this trial's values, reporting every eval."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.finetune import run_job

    trial = tune.get_context().get_trial_id()
    if Path(sweep["cwd"]).is_dir():  # Tune runs a trial in its own directory: relative paths in
        os.chdir(sweep["cwd"])  # the job config mean the sweep's directory, as on the command line
    overrides = [
        *sweep["overrides"],
        *(f"{k}={v}" for k, v in params.items()),
        f"run.name={sweep['name']}-{trial}",
        f"checkpoint.storage_path={sweep['runs']}",
    ]
    cfg = load_config(sweep["job"], overrides)
    if cfg.scaling.local:  # the job trains in this trial's process and reports to Tune itself
        hooks = {"on_report": report_to_tune}
    else:  # Ray Train's controller forwards its workers' reports
        hooks = {"callbacks": [TuneReportCallback()]}
    summary = run_job(cfg, **hooks, sweep={"name": sweep["name"], "trial": trial, "params": params})
    # the final report carries the final evaluation; it has reached Tune (callback or on_report)
    log.info("trial %s finished: %s", trial, summary["metrics"])


def report_to_tune(metrics: dict, checkpoint_path: str | None) -> None:
    """What `TuneReportCallback` reports for a job on workers: the metrics, and where the
    checkpoint they came with is. Tune may stop the trial here (SystemExit)."""
    from ray import tune

    extra = {"checkpoint_path": checkpoint_path} if checkpoint_path else {}
    tune.report({**metrics, **extra})


def trial_resources(job):
    """A trial that trains in its own process (scaling.local) holds its worker's resources; one
    whose job starts Ray Train workers holds almost nothing (Tune rejects 0): they hold them."""
    from ray.tune import PlacementGroupFactory

    sc = job.scaling
    if not sc.local:
        return {"cpu": 0.01}
    bundle = {"CPU": sc.cpus_per_worker, "GPU": 1 if sc.use_gpu else 0, **sc.resources_per_worker}
    return PlacementGroupFactory([bundle])


# ---------------------------------------------------------------- the sweep


def sweep_dir(cfg: SweepConfig) -> str:
    """storage_path/name: an absolute local directory or s3://bucket/prefix/name."""
    if is_remote(cfg.storage_path):
        return join(cfg.storage_path, cfg.name)
    return str((Path(cfg.storage_path) / cfg.name).resolve())


def run_sweep(cfg: SweepConfig, resume: bool = True) -> dict[str, Any]:
    """Run (or resume) the sweep; returns the summary written to results.json."""
    import ray
    from ray import tune

    from core.ray_cluster import init_ray

    init_ray()
    job = load_config(cfg.job, cfg.overrides)
    root = sweep_dir(cfg)
    if not is_remote(root):
        Path(root).mkdir(parents=True, exist_ok=True)
    sweep = {
        "name": cfg.name,
        "job": str(Path(cfg.job).resolve()),
        "overrides": cfg.overrides,
        "runs": f"{root}/runs",
        "cwd": os.getcwd(),
    }
    host = None  # a packed sweep's pack host: it holds the sweep's CPUs until killed
    if cfg.pack_trials > 1:
        from tune.packed_trials import packed_trainable

        trainable, host = packed_trainable(cfg, job, sweep)
    else:
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, sweep=sweep), trial_resources(job)
        )
    tuner = restored_tuner(root, trainable) if resume else None
    tuner = tuner or new_tuner(cfg, job, root, trainable)
    start = time.time()
    try:
        results = tuner.fit()
    finally:
        if host is not None:  # else it outlives the sweep in this Ray (the pipeline serves next)
            ray.kill(host)
        release_stranded_placement_groups()
    summary = summarize(cfg, results, root, time.time() - start, ray.available_resources())
    return summary


def release_stranded_placement_groups() -> int:
    """Remove the placement groups this job still holds once the sweep is over; returns how many.

    Ray Train (2.60) registers a worker group's placement group with its cleaner only once the
    group has started, so a trial that Tune stops while its workers start (the sweep's budget
    ending it, a time limit) leaves that group and its CPUs held until the driver exits: the next
    sweep in the same process (the benchmark, the pipeline, a notebook) then waits forever for
    them. Nothing of this job needs a placement group after Tune returns."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_placement_groups

    context = ray.get_runtime_context()
    # the embedded Ray's dashboard (jobs.distributed): the state API client would otherwise look
    # for "the" local Ray and fail whenever another one runs on the machine
    env = (context.runtime_env or {}).get("env_vars") or {}
    address = env.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS")
    try:
        groups = list_placement_groups(
            address=address, filters=[("creator_job_id", "=", context.get_job_id())], limit=10_000
        )
    except Exception as e:  # the sweep's results matter more than this clean-up
        log.warning("could not list placement groups to release stranded ones: %s", e)
        return 0
    stranded = [g for g in groups if g.state in ("CREATED", "PENDING", "RESCHEDULING")]
    for group in stranded:
        pg_id = ray.PlacementGroupID(bytes.fromhex(group.placement_group_id))
        remove_placement_group(PlacementGroup(pg_id))
    if stranded:
        log.info("released %d placement group(s) left by stopped trials", len(stranded))
    return len(stranded)


def restored_tuner(root: str, trainable):
    """The Tuner of an interrupted (or finished) sweep in root, None when there is none."""
    from ray import tune

    # on S3 Tune gets a path inside the bucket and a filesystem with the endpoint, as Train does
    storage_path, storage_fs = ray_storage(root)
    if not tune.Tuner.can_restore(f"{storage_path}/tune", storage_fs):
        return None
    log.info("resuming the sweep from %s/tune", root)
    return tune.Tuner.restore(
        f"{storage_path}/tune",
        trainable=trainable,
        resume_errored=True,
        storage_filesystem=storage_fs,
    )


def new_tuner(cfg: SweepConfig, job, root: str, trainable):
    from ray import tune

    storage_path, storage_fs = ray_storage(root)
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=cfg.scheduler.metric,
            mode=cfg.scheduler.mode,
            scheduler=trial_scheduler(cfg, job.eval.every_steps, plan_total_steps(job)),
            num_samples=num_samples(cfg),
            time_budget_s=cfg.budget.time_s,
            search_alg=search_algorithm(cfg),  # it carries max_concurrent_trials
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            stop=BudgetStopper(cfg.budget, job.scaling.num_workers),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            # the live table (plain lines when stdout is not a terminal) instead of Tune's own
            callbacks=[progress_callback(list(cfg.space), None)],
            verbose=0,
        ),
    )


def plan_total_steps(job) -> int:
    from inference.model import load_tokenizer
    from jobs.data.prepare import prepare_data
    from jobs.finetune import plan_steps

    data = prepare_data(job.data, load_tokenizer(job.model), job.run.seed)
    return plan_steps(len(data.train), job).total_steps


def _stopper_base():
    from ray.tune import Stopper

    return Stopper


class BudgetStopper(_stopper_base()):
    """Stops every trial once the sweep has used its worker-hours or its training steps (time is
    Tune's own budget)."""

    def __init__(self, budget: BudgetConfig, workers_per_trial: int):
        self.limit_s = budget.worker_hours * 3600 if budget.worker_hours else None
        self.limit_steps = budget.steps
        self.workers = workers_per_trial
        self.seconds: dict[str, float] = {}
        self.steps: dict[str, int] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.seconds[trial_id] = result.get("time_total_s", 0.0) * self.workers
        self.steps[trial_id] = result.get("step", 0)
        return self.stop_all()

    def stop_all(self) -> bool:
        over_time = self.limit_s is not None and sum(self.seconds.values()) >= self.limit_s
        over_steps = self.limit_steps is not None and sum(self.steps.values()) >= self.limit_steps
        return over_time or over_steps


def trial_row(cfg: SweepConfig, r, root: str) -> dict[str, Any]:
    """One trial's line in results.json. A trial stopped early is one without its run.json: the
    job writes it at its end, whatever its objective or task metric."""
    metrics = r.metrics or {}
    history = r.metrics_dataframe
    evals = (
        history[["step", "eval_loss"]].dropna().values.tolist()
        if history is not None and "eval_loss" in history
        else []
    )
    run_dir = f"{root}/runs/{cfg.name}-{metrics['trial_id']}" if metrics else None
    finished = bool(run_dir) and url_exists(f"{run_dir}/run.json")
    return {
        "trial": metrics.get("trial_id", "?"),
        **{k: r.config.get(k) for k in cfg.space},
        "steps": int(metrics.get("step", 0)),
        "best_eval_loss": min((e for _, e in evals), default=math.nan),
        "exact_match": metrics.get("exact_match"),
        "stopped_early": bool(metrics.get("step", 0) and not finished and not r.error),
        "error": str(r.error).splitlines()[0][:200] if r.error else None,
        "run_dir": run_dir,
        "evals": evals,
    }


def summarize(cfg: SweepConfig, results, root: str, wall_s: float, _resources) -> dict[str, Any]:
    """results.csv / results.json / plots into root (local or s3://), sorted best first."""
    rows = [trial_row(cfg, r, root) for r in results]
    key = "best_eval_loss"
    rows.sort(
        key=lambda row: (
            math.isnan(row[key]),
            row[key] if cfg.scheduler.mode == "min" else -row[key],
        )
    )
    summary = {
        "name": cfg.name,
        "wall_s": round(wall_s, 1),
        "trials": rows,
        "total_steps": sum(r["steps"] for r in rows),
        "best": rows[0] if rows else None,
    }
    with open_url(f"{root}/results.json", "w") as f:
        f.write(json.dumps(summary, indent=2, default=str))
    write_csv(f"{root}/results.csv", rows, list(cfg.space))
    plot(root, rows, list(cfg.space))
    return summary


def write_csv(url: str, rows: list[dict], params: list[str]) -> None:
    import csv

    cols = ["trial", *params, "steps", "best_eval_loss", "exact_match", "stopped_early", "error"]
    with open_url(url, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot(root: str, rows: list[dict], params: list[str]) -> None:
    """eval_curves.png (eval loss per trial) and one metric-vs-parameter scatter per key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        if row["evals"]:
            steps, losses = zip(*row["evals"], strict=True)
            ax.plot(steps, losses, marker="o", label=row["trial"])
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, f"{root}/eval_curves.png")
    plt.close(fig)
    for p in params:
        fig, ax = plt.subplots(figsize=(4, 3))
        xs = [r[p] for r in rows if not math.isnan(r["best_eval_loss"])]
        ys = [r["best_eval_loss"] for r in rows if not math.isnan(r["best_eval_loss"])]
        ax.scatter(xs, ys)
        if p.endswith("lr") and xs and all(isinstance(x, int | float) and x > 0 for x in xs):
            ax.set_xscale("log")
        ax.set_xlabel(p)
        ax.set_ylabel("best eval loss")
        fig.tight_layout()
        save_png(fig, f"{root}/eval_loss_vs_{p.replace('.', '_')}.png")
        plt.close(fig)


def save_png(fig, url: str) -> None:
    with open_url(url, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def print_table(summary: dict[str, Any], params: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"sweep {summary['name']} ({summary['wall_s']} s, {summary['total_steps']} steps)"
    )
    for col in ("trial", *params, "steps", "best eval loss", "exact match", "stopped early?"):
        table.add_column(col)
    for r in summary["trials"]:
        table.add_row(
            r["trial"],
            *(f"{r[p]:.3g}" if isinstance(r[p], float) else str(r[p]) for p in params),
            str(r["steps"]),
            f"{r['best_eval_loss']:.4f}",
            "-" if r["exact_match"] is None else f"{r['exact_match']:.1%}",
            "error" if r["error"] else ("yes" if r["stopped_early"] else "no"),
        )
    console = Console()
    if not console.is_terminal:  # job logs: rich would wrap the table at 80 columns
        console = Console(width=160)
    console.print(table)


def explain(cfg: SweepConfig) -> list[str]:
    """The sweep's plan, before anything runs: the space, the searcher, the scheduler's rungs and
    the budget in steps, time and worker-hours."""
    job = load_config(cfg.job, cfg.overrides)
    steps, every = plan_total_steps(job), job.eval.every_steps
    trials = trial_count(cfg)
    lines = [
        f"sweep {cfg.name}: {trials} trials of {cfg.job}, {cfg.max_concurrent_trials} at a time"
    ]
    order = " (shuffled)" if shuffled_grid(cfg) else ""
    lines.append(f"search: {cfg.search}{order}, seed {cfg.seed}")
    lines += [
        f"  {key}: {kind} {values}"
        for key, spec in cfg.space.items()
        for kind, values in spec.items()
    ]
    lines.append(scheduler_line(cfg, every, steps))
    budget, workers = cfg.budget, job.scaling.num_workers
    limits = [
        f"{budget.steps} steps in all" if budget.steps else None,
        f"{budget.time_s:g} s" if budget.time_s else None,
        f"{budget.worker_hours:g} worker-hours" if budget.worker_hours else None,
    ]
    lines.append(
        f"budget: {steps} steps a trial, {steps * trials} if every trial ran to its end; "
        f"stops at {', '.join(x for x in limits if x) or 'no limit'}"
    )
    where = " in the trial's process (scaling.local)" if job.scaling.local else ""
    lines.append(f"each trial: {workers} worker(s) x {job.scaling.cpus_per_worker:g} CPU{where}")
    if cfg.pack_trials > 1:
        lines.append(f"packed: {cfg.pack_trials} trials share one copy of {job.model.name_or_path}")
    return lines


def scheduler_line(cfg: SweepConfig, every: int | None, steps: int) -> str:
    sched = cfg.scheduler
    if sched.type == "none":
        return "scheduler: none (every trial runs to its end)"
    rf = sched.reduction_factor
    if sched.type == "hyperband":
        return f"scheduler: HyperBand for BOHB on {sched.metric} ({sched.mode}), reduction factor {rf:g}, max {steps} steps"
    rungs = asha_rungs(sched.grace_period * every, rf, steps + 1) if every else []
    return (
        f"scheduler: ASHA on {sched.metric} ({sched.mode}), evals every {every} steps; rungs at steps "
        f"{', '.join(f'{r:g}' for r in rungs)}: past a rung only the best 1/{rf:g} so far go on"
    )


def promote_best(cfg: SweepConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the best finished trial, gate it, and promote it if it passes."""
    from tune.evaluate import evaluate_target, load_eval_config
    from tune.registry import Registry
    from tune.registry.promote import gate_and_promote

    finished = [
        r for r in summary["trials"] if r["run_dir"] and url_exists(f"{r['run_dir']}/run.json")
    ]
    if not finished:
        return {"promoted": False, "reason": "no trial finished"}
    best = finished[0]
    results, _ = evaluate_target(best["run_dir"], load_eval_config(cfg.promote.eval))
    outcome = {"trial": best["trial"], "run_dir": best["run_dir"], "gate": results.get("gate")}
    registry, name, alias = Registry(cfg.promote.registry), cfg.promote.name, cfg.promote.alias
    promotion = gate_and_promote(registry, best["run_dir"], name, alias, results)
    if not promotion.promoted:
        return {**outcome, "promoted": False, "reason": promotion.reason}
    return {**outcome, "promoted": True, "version": promotion.version, "name": name, "alias": alias}


def main(
    config: Annotated[Path, typer.Argument(help="sweep YAML")],
    overrides: Annotated[list[str] | None, typer.Argument(help="dotted overrides")] = None,
    fresh: Annotated[bool, typer.Option(help="start over instead of resuming")] = False,
    explain_only: Annotated[
        bool, typer.Option("--explain", help="print the space and the budget, run nothing")
    ] = False,
) -> None:
    """Sweep, then (with a promote section) evaluate, gate and promote the best trial."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_sweep_config(config, overrides or [])
    if explain_only:
        typer.echo("\n".join(explain(cfg)))
        return
    summary = run_sweep(cfg, resume=not fresh)
    print_table(summary, list(cfg.space))
    typer.echo(f"results: {sweep_dir(cfg)}/results.csv, plots: {sweep_dir(cfg)}/*.png")
    if cfg.promote:
        outcome = promote_best(cfg, summary)
        with open_url(f"{sweep_dir(cfg)}/promotion.json", "w") as f:
            f.write(json.dumps(outcome, indent=2, default=str))
        typer.echo(
            ("promoted " + f"{outcome['name']}@{outcome['version']} ({outcome['alias']})")
            if outcome["promoted"]
            else f"not promoted: {outcome['reason']}"
        )


if __name__ == "__main__":
    cli.run(main)
