"""tune.progress: the sweep's trial state and its table without Ray, the plain lines a job log
gets, and the callback inside a real 3-trial ASHA run on 2 CPUs."""

from __future__ import annotations

import pickle
from io import StringIO
from types import SimpleNamespace

import pytest
from rich.console import Console

from tune.progress import (
    ERROR,
    FINISHED,
    PENDING,
    RUNNING,
    STOPPED,
    SweepProgress,
    header,
    progress_callback,
    render,
)

PARAMS = ["optim.lr", "lora.r"]


def text_of(renderable, width: int = 200) -> str:
    console = Console(file=StringIO(), width=width, force_terminal=False)
    console.print(renderable)
    return console.file.getvalue()


def plain_console() -> Console:
    return Console(file=StringIO(), width=200, force_terminal=False)


def sweep_with_three_trials() -> SweepProgress:
    """t1 finished (final report with exact_match), t2 stopped by the scheduler, t3 running."""
    p = SweepProgress(PARAMS, total_trials=4, started=100.0)
    for tid, lr in (("t1", 1e-3), ("t2", 3e-4), ("t3", 1e-4)):
        p.start(tid, {"optim.lr": lr, "lora.r": 8, "unswept": 1})
    for step, loss in ((10, 0.9), (20, 0.7), (30, 0.8)):
        p.report("t1", {"step": step, "eval_loss": loss})
    p.report("t1", {"step": 30, "eval_loss": 0.8, "exact_match": 0.5})
    p.end("t1", {"step": 30, "exact_match": 0.5, "done": True})
    p.report("t2", {"step": 10, "eval_loss": 1.2, "done": True})
    p.end("t2", {"step": 10, "eval_loss": 1.2, "done": True})
    p.report("t3", {"step": 10, "eval_loss": 0.95})
    return p


def test_state_keeps_latest_and_best_loss_and_tells_stopped_from_finished():
    p = sweep_with_three_trials()
    t1, t2, t3 = p.trials["t1"], p.trials["t2"], p.trials["t3"]
    assert t1.params == {"optim.lr": 1e-3, "lora.r": 8}  # only the swept keys
    assert (t1.status, t1.step, t1.eval_loss, t1.best_loss, t1.evals) == (FINISHED, 30, 0.8, 0.7, 4)
    assert (t2.status, t2.best_loss) == (STOPPED, 1.2)
    assert (t3.status, t3.eval_loss) == (RUNNING, 0.95)
    assert (p.done, p.total_steps) == (2, 50)
    # a report without eval_loss (a checkpoint-only one) moves the step, not the losses
    assert p.report("t3", {"step": 15}) is None
    assert (t3.step, t3.eval_loss, t3.evals) == (15, 0.95, 1)


def test_a_trial_that_returns_without_exact_match_is_finished_unless_tune_stopped_it():
    p = SweepProgress(PARAMS)
    # a job with task_metric: none ends on its own: Tune sets done on its last result
    p.report("own", {"step": 40, "eval_loss": 0.5})
    assert p.end("own", {"step": 40, "eval_loss": 0.5, "done": True}).status == FINISHED
    # the sweep's time budget ends a running trial from outside: no done on its last result
    p.report("cut", {"step": 20, "eval_loss": 0.6})
    assert p.end("cut", {"step": 20, "eval_loss": 0.6}).status == STOPPED
    assert p.end("bad", {"step": 5}, error="ValueError: boom").status == ERROR


def test_render_has_a_row_per_trial_with_values_status_and_losses():
    p = sweep_with_three_trials()
    p.add("t4", {"optim.lr": 5e-5, "lora.r": 16})
    table = render(list(p.trials.values()), PARAMS, title=header(p, 65.0))
    out = text_of(table)
    assert table.row_count == 4
    assert [c.header for c in table.columns] == [
        "trial", "optim.lr", "lora.r", "status", "step", "eval loss", "best"
    ]  # fmt: skip
    assert "sweep 1m05s | trials 2/4 done | 50 steps" in out
    cells = [[c.strip() for c in ln.strip("│ ").split("│")] for ln in out.splitlines() if "│" in ln]
    rows = {row[0]: row for row in cells}
    assert rows["t1"] == ["t1", "0.001", "8", FINISHED, "30", "0.8000", "0.7000"]
    assert rows["t2"] == ["t2", "0.0003", "8", STOPPED, "10", "1.2000", "1.2000"]
    assert rows["t3"] == ["t3", "0.0001", "8", RUNNING, "10", "0.9500", "0.9500"]
    assert rows["t4"] == ["t4", "5e-05", "16", PENDING, "-", "-", "-"]


def fake_trial(tid: str, last_result: dict | None = None, status="RUNNING", error=None):
    """What the callback reads of a Tune Trial."""
    return SimpleNamespace(
        trial_id=tid,
        config={"optim.lr": 0.01, "lora.r": 4},
        status=status,
        last_result=last_result or {},
        get_error=lambda: error,
    )


def drive(cb, trials, t1, t2) -> None:
    """t1 reports twice and finishes; t2 reports once and errors."""
    cb.setup(total_num_samples=2)
    cb.on_trial_start(iteration=1, trials=trials, trial=t1)
    cb.on_trial_start(iteration=1, trials=trials, trial=t2)
    cb.on_trial_result(iteration=2, trials=trials, trial=t1, result={"step": 10, "eval_loss": 0.6})
    cb.on_trial_result(iteration=3, trials=trials, trial=t1, result={"step": 20, "eval_loss": 0.7})
    cb.on_trial_result(iteration=3, trials=trials, trial=t2, result={"step": 10, "eval_loss": 0.9})
    t1.last_result = {"step": 20, "eval_loss": 0.7, "exact_match": 0.25, "done": True}
    cb.on_trial_complete(iteration=4, trials=trials, trial=t1)
    cb.on_trial_error(iteration=5, trials=trials, trial=t2)
    cb.on_experiment_end(trials=trials)


def test_off_a_terminal_one_plain_line_per_eval_and_per_trial_end():
    console = plain_console()
    cb = progress_callback(PARAMS, None, console=console)
    t1, t2 = fake_trial("a1_00000"), fake_trial("a1_00001", error="Traceback\n  ...\nOSError: disk")
    drive(cb, [t1, t2], t1, t2)
    assert console.file.getvalue().splitlines() == [
        "trial a1_00000 step 10 eval_loss 0.6000 (best 0.6000)",
        "trial a1_00000 step 20 eval_loss 0.7000 (best 0.6000)",
        "trial a1_00001 step 10 eval_loss 0.9000 (best 0.9000)",
        "trial a1_00000 finished at step 20, best eval_loss 0.6000 (1/2 done)",
        "trial a1_00001 failed at step 10, best eval_loss 0.9000 (2/2 done): OSError: disk",
    ]
    assert cb.progress.total_trials == 2  # from Tune's setup when none was given


def test_on_a_terminal_a_live_table_instead_of_lines():
    console = Console(file=StringIO(), width=200, force_terminal=True)
    cb = progress_callback(PARAMS, 2, console=console)
    t1, t2 = fake_trial("a1_00000"), fake_trial("a1_00001", error="OSError: disk")
    drive(cb, [t1, t2], t1, t2)
    out = console.file.getvalue()
    assert "\x1b[" in out and "eval_loss 0.6000 (best" not in out
    assert "trials 2/2 done" in out and "error: OSError: disk" in out
    assert cb._live is None  # stopped at the experiment's end: the cursor is back


def test_a_resumed_sweep_shows_its_earlier_trials_and_the_callback_pickles():
    # Tune pickles the RunConfig into tuner.pkl; Tuner.restore brings this callback back
    cb = pickle.loads(pickle.dumps(progress_callback(PARAMS, 3, console=plain_console())))
    cb.setup(total_num_samples=3)
    done = fake_trial("r_0", {"step": 30, "exact_match": 0.5, "done": True}, "TERMINATED")
    failed = fake_trial("r_1", {"step": 10}, "ERROR", error="RuntimeError: oom")
    waiting = fake_trial("r_2", status="PENDING")
    cb.on_step_end(iteration=1, trials=[done, failed, waiting])
    statuses = {tid: r.status for tid, r in cb.progress.trials.items()}
    assert statuses == {"r_0": FINISHED, "r_1": ERROR, "r_2": PENDING}
    assert cb.progress.trials["r_1"].error == "RuntimeError: oom"


def test_a_retried_trial_is_pending_with_its_error_until_it_runs_again():
    console = plain_console()
    cb = progress_callback(PARAMS, 1, console=console)
    t = fake_trial("x_0", error="ConnectionError: node lost")
    cb.setup()
    cb.on_trial_start(iteration=1, trials=[t], trial=t)
    cb.on_trial_result(iteration=2, trials=[t], trial=t, result={"step": 10, "eval_loss": 0.6})
    cb.on_trial_recover(iteration=3, trials=[t], trial=t)
    row = cb.progress.trials["x_0"]
    assert (row.status, row.error) == (PENDING, "retrying after ConnectionError: node lost")
    assert console.file.getvalue().splitlines()[-1] == (
        "trial x_0 failed at step 10, retrying: ConnectionError: node lost"
    )
    cb.on_trial_restore(iteration=4, trials=[t], trial=t)
    assert (row.status, row.error, row.best_loss) == (RUNNING, None, 0.6)


# ---------------------------------------------------------------- a real Ray Tune run

STEPS = 4


def fake_job_trainable():
    """A trainable reporting a fake eval_loss at steps 1..STEPS, then a final report with
    exact_match, as the job does; the loss level is the trial's `level`. Made in a function so
    that it pickles by value: Ray's workers cannot import a test module by name."""

    def fake_job(config: dict) -> None:
        from ray import tune

        for step in range(1, STEPS + 1):
            tune.report({"step": step, "eval_loss": config["level"] + 1 / step})
        tune.report({"step": STEPS, "eval_loss": config["level"], "exact_match": 0.5})

    return fake_job


@pytest.mark.integration
def test_a_real_asha_sweep_reports_each_trial_and_ends_with_the_right_statuses(ray_local, tmp_path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    console = plain_console()
    cb = progress_callback(["level"], 3, console=console)
    # One trial at a time, in grid order, so ASHA's decisions depend on the order of the
    # results, not on the machine's speed: the worst trial runs first and sets the first
    # rung, the best goes past it, and the third (worse than their median) is stopped at step 1.
    tuner = tune.Tuner(
        tune.with_resources(fake_job_trainable(), {"cpu": 1}),
        param_space={"level": tune.grid_search([1.0, 0.5, 0.9])},
        tune_config=tune.TuneConfig(
            metric="eval_loss",
            mode="min",
            max_concurrent_trials=1,
            scheduler=ASHAScheduler(
                time_attr="step", max_t=STEPS + 1, grace_period=1, reduction_factor=2
            ),
        ),
        run_config=tune.RunConfig(
            name="progress", storage_path=str(tmp_path), callbacks=[cb], verbose=0
        ),
    )
    results = tuner.fit()
    assert not results.errors
    rows = {r.params["level"]: r for r in cb.progress.trials.values()}
    assert {lvl: r.status for lvl, r in rows.items()} == {
        1.0: FINISHED,
        0.5: FINISHED,
        0.9: STOPPED,
    }
    assert {lvl: r.evals for lvl, r in rows.items()} == {1.0: STEPS + 1, 0.5: STEPS + 1, 0.9: 1}
    assert rows[0.5].best_loss == 0.5 and rows[0.9].step == 1
    lines = console.file.getvalue().splitlines()
    for r in rows.values():  # every eval report, then one end line, per trial
        mine = [ln for ln in lines if ln.startswith(f"trial {r.trial_id} ")]
        assert len(mine) == r.evals + 1, lines
        assert "stopped early" in mine[-1] if r.status == STOPPED else "finished" in mine[-1]
    assert "\x1b[" not in console.file.getvalue()
