"""What a sweep tries and when it stops a trial: the searcher, the scheduler and their plan.

Searchers: `random` and `grid` (Tune's variant generator; a grid under ASHA runs in a seeded
shuffled order, see `grid_points`), `optuna` (Tune's OptunaSearch: TPE) and `bohb` (TuneBOHB,
with the HyperBandForBOHB scheduler it is built for). Schedulers: ASHA stopping trials at their
evals, HyperBand for BOHB, or none. Everything here is a function of the sweep config: nothing
runs a trial, so `python -m tune.sweep --explain` can print the plan first.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

from core.config import ConfigError

MODEL_BASED = ("optuna", "bohb")


def search_space(cfg) -> dict[str, Any]:
    """The space as Tune domains. A shuffled grid (ASHA) is given as points to evaluate instead:
    its keys are then categorical, which is what the generator fills the points into."""
    from ray import tune

    makers = {
        "choice": tune.choice,
        "grid": tune.choice if shuffled_grid(cfg) else tune.grid_search,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
    }
    return {
        key: makers[kind](values)
        for key, spec in cfg.space.items()
        for kind, values in spec.items()
    }


def shuffled_grid(cfg) -> bool:
    """A grid under ASHA runs in a shuffled order: in the given order (e.g. learning rates
    ascending) the first, similar trials pass their rungs unopposed (benchmarks/README.md)."""
    return cfg.search == "grid" and cfg.scheduler.type == "asha" and cfg.scheduler.shuffle_grid


def grid_points(cfg) -> list[dict[str, Any]]:
    """Every grid point, num_trials times, shuffled with the sweep's seed."""
    keys = list(cfg.space)
    values = [cfg.space[k]["grid"] for k in keys]
    points = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
    points = points * cfg.num_trials
    random.Random(cfg.seed).shuffle(points)
    return points


def num_samples(cfg) -> int:
    """Tune's num_samples: the grid repeats (Tune multiplies them by the grid), or the samples."""
    if cfg.search == "grid" and not shuffled_grid(cfg):
        return cfg.num_trials
    return trial_count(cfg)


def trial_count(cfg) -> int:
    """How many trials the sweep runs: the grid times num_trials, or num_trials samples."""
    if cfg.search == "grid":
        return math.prod(len(spec["grid"]) for spec in cfg.space.values()) * cfg.num_trials
    return cfg.num_trials


def search_algorithm(cfg):
    """The searcher, limited to max_concurrent_trials (Tune ignores the TuneConfig limit for an
    explicitly passed searcher)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    metric, mode = cfg.scheduler.metric, cfg.scheduler.mode
    concurrent = cfg.max_concurrent_trials
    if cfg.search == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        # a seeded TPE sampler: the same sweep suggests the same configs
        sampler = TPESampler(seed=cfg.seed, n_startup_trials=cfg.scheduler.startup_trials)
        searcher = OptunaSearch(metric=metric, mode=mode, sampler=sampler)
        return ConcurrencyLimiter(searcher, max_concurrent=concurrent)
    if cfg.search == "bohb":
        from ray.tune.search.bohb import TuneBOHB

        searcher = TuneBOHB(metric=metric, mode=mode, seed=cfg.seed)
        return ConcurrencyLimiter(searcher, max_concurrent=concurrent)
    points = grid_points(cfg) if shuffled_grid(cfg) else None
    return tune.search.BasicVariantGenerator(
        points_to_evaluate=points, random_state=cfg.seed, max_concurrent=concurrent
    )


def trial_scheduler(cfg, eval_every: int | None, total_steps: int):
    """ASHA stopping trials at their evals (in steps), HyperBand for BOHB, or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandForBOHB

    kind = cfg.scheduler.type
    if kind == "none":
        return FIFOScheduler()
    if not eval_every:
        raise ConfigError(
            f"{cfg.job}: eval.every_steps must be set for {kind} (it stops trials at evals)"
        )
    # one step past the end: at max_t a scheduler stops a trial, and a trial stopped at its final
    # report would never write its adapter and run.json
    max_t = total_steps + 1
    if kind == "hyperband":
        return HyperBandForBOHB(
            time_attr="step", max_t=max_t, reduction_factor=cfg.scheduler.reduction_factor
        )
    return ASHAScheduler(
        time_attr="step",
        max_t=max_t,
        grace_period=cfg.scheduler.grace_period * eval_every,
        reduction_factor=cfg.scheduler.reduction_factor,
    )


def asha_rungs(grace_steps: int, reduction_factor: float, max_t: int) -> list[float]:
    """The steps at which ASHA compares a trial with the others, as Ray's ASHA bracket lays them out
    (grace * rf^k while below max_t)."""
    count = int(math.log(max_t / grace_steps) / math.log(reduction_factor) + 1)
    return [grace_steps * reduction_factor**k for k in range(count)]


def replay_asha(
    curves: list[list[tuple[int, float]]],
    grace_steps: int,
    reduction_factor: float,
    concurrent: int,
    max_t: int,
) -> list[int]:
    """Ray's ASHA bracket replayed on measured eval curves [(step, metric), ...] (one per trial,
    in start order), `concurrent` trials at a time, a step costing one unit of time: the steps
    each trial would train before ASHA stopped it. For choosing the scheduler's settings from a
    full grid's curves without running a sweep per setting."""
    from ray.tune.schedulers import TrialScheduler

    from core.upstream.ray import asha_bracket

    bracket = asha_bracket(grace_steps, max_t, reduction_factor)
    queue, running, trained, clock = list(enumerate(curves)), [], [0] * len(curves), 0
    while queue or running:
        while queue and len(running) < concurrent:
            index, curve = queue.pop(0)
            running.append((clock, index, list(curve)))
        # the next event: the running trial whose next eval comes first
        event = min(running, key=lambda r: r[0] + r[2][0][0])
        start, index, evals = event
        step, value = evals.pop(0)
        clock, trained[index] = start + step, step
        action = bracket.on_result(type("T", (), {"trial_id": str(index)}), step, -value)
        if action == TrialScheduler.STOP or not evals:
            running.remove(event)
    return trained
