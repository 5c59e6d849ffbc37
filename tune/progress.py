"""Watching a sweep: a live table of its trials in a terminal, one plain line per report elsewhere.

    RunConfig(callbacks=[progress_callback(list(cfg.space), cfg.num_trials)], verbose=0)

`SweepProgress` is what the sweep has seen so far (one `TrialRow` per trial); `render` turns it
into a rich Table and `report_line` / `end_line` into the lines a job log gets. The Tune
callback only feeds Tune's events into the state and shows it, so all of the rest is tested
without Ray.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

PENDING, RUNNING, FINISHED, ERROR = "pending", "running", "finished", "error"
STOPPED = "stopped early"  # by the scheduler (ASHA), a stopper or the sweep's time budget
STATUS_STYLE = {PENDING: "dim", RUNNING: "cyan", STOPPED: "yellow", FINISHED: "green", ERROR: "red"}


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    status: str = PENDING
    step: int | None = None
    eval_loss: float | None = None
    best_loss: float | None = None
    evals: int = 0  # eval reports seen
    error: str | None = None
    stop_decided: bool = False  # Tune sent a result with done=True: its scheduler or a stopper


@dataclass
class SweepProgress:
    """The trials of one sweep as reported so far; every method is a plain state change."""

    params: list[str]
    total_trials: int | None = None
    started: float = field(default_factory=time.monotonic)
    trials: dict[str, TrialRow] = field(default_factory=dict)

    def add(self, trial_id: str, config: dict[str, Any]) -> TrialRow:
        """The trial's row, created pending (with its swept values) the first time it is seen."""
        if trial_id not in self.trials:
            self.trials[trial_id] = TrialRow(trial_id, {p: config.get(p) for p in self.params})
        return self.trials[trial_id]

    def start(self, trial_id: str, config: dict[str, Any]) -> TrialRow:
        row = self.add(trial_id, config)
        row.status, row.error = RUNNING, None  # a retried trial starts again
        return row

    def report(self, trial_id: str, result: dict[str, Any]) -> TrialRow | None:
        """Takes one Tune result; returns the row when the result was an eval report."""
        row = self.add(trial_id, result.get("config") or {})
        # Tune marks done=True on the result it decided to stop the trial at; a trial that
        # returns on its own ends with a result the callbacks never see
        row.stop_decided = row.stop_decided or bool(result.get("done"))
        if result.get("step") is not None:
            row.step = int(result["step"])
        loss = result.get("eval_loss")
        if loss is None or (isinstance(loss, float) and math.isnan(loss)):
            return None
        row.eval_loss, row.evals = float(loss), row.evals + 1
        row.best_loss = row.eval_loss if row.best_loss is None else min(row.best_loss, loss)
        return row

    def end(self, trial_id: str, last_result: dict[str, Any] | None, error: str | None = None):
        """A trial's end: finished when the job's final report (the only one with exact_match)
        arrived, or when it returned on its own (Tune then sets done on its last result) with
        no stop decided; stopped otherwise (scheduler, stopper, the sweep's time budget)."""
        last = last_result or {}
        row = self.add(trial_id, last.get("config") or {})
        if error is not None:
            row.status, row.error = ERROR, error
            return row
        # exact_match alone would call every trial of a job without it (task_metric: none,
        # dpo) stopped; done alone cannot tell a scheduler's stop from a natural end
        ended_itself = bool(last.get("done")) and not row.stop_decided
        row.status = FINISHED if "exact_match" in last or ended_itself else STOPPED
        return row

    @property
    def done(self) -> int:
        return sum(r.status in (STOPPED, FINISHED, ERROR) for r in self.trials.values())

    @property
    def total_steps(self) -> int:
        return sum(r.step or 0 for r in self.trials.values())

    def elapsed_s(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.started


def _value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _loss(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else f"{m}m{s:02d}s"


def header(progress: SweepProgress, elapsed_s: float) -> str:
    total = progress.total_trials if progress.total_trials else "?"
    return (
        f"sweep {_duration(elapsed_s)} | trials {progress.done}/{total} done | "
        f"{progress.total_steps} steps"
    )


def render(trials: list[TrialRow], params: list[str], *, title: str | None = None) -> Table:
    """One row per trial, in the order given: swept values, status, step, latest and best loss."""
    table = Table(title=title, title_justify="left")
    for col in ("trial", *params, "status", "step", "eval loss", "best"):
        table.add_column(col, justify="right" if col in ("step", "eval loss", "best") else "left")
    for r in trials:
        status = f"{r.status}: {r.error}" if r.error else r.status
        table.add_row(
            r.trial_id,
            *(_value(r.params.get(p)) for p in params),
            f"[{STATUS_STYLE[r.status]}]{status}[/]",
            "-" if r.step is None else str(r.step),
            _loss(r.eval_loss),
            _loss(r.best_loss),
        )
    return table


def render_progress(progress: SweepProgress, now: float | None = None) -> Table:
    return render(
        list(progress.trials.values()),
        progress.params,
        title=header(progress, progress.elapsed_s(now)),
    )


def report_line(row: TrialRow) -> str:
    return f"trial {row.trial_id} step {row.step} eval_loss {row.eval_loss:.4f} (best {row.best_loss:.4f})"


def end_line(row: TrialRow, progress: SweepProgress) -> str:
    what = {STOPPED: "stopped early", FINISHED: "finished", ERROR: "failed"}[row.status]
    line = f"trial {row.trial_id} {what} at step {row.step}, best eval_loss {_loss(row.best_loss)}"
    line += f" ({progress.done}/{progress.total_trials or '?'} done)"
    return f"{line}: {row.error}" if row.error else line


# ---------------------------------------------------------------- the Tune callback


def _callback_base():
    from ray.tune import Callback

    return Callback


def _error_summary(trial) -> str:
    """The last line of the trial's error (the exception), short enough for a table cell."""
    try:
        text = str(trial.get_error() or "")
    except Exception:  # the error file lives in trial storage, which may be unreachable
        text = ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "error")[:120]


class SweepProgressCallback(_callback_base()):
    """Feeds Tune's trial events into a SweepProgress, shown as a Live table on a terminal and
    as plain lines (one per eval report, one per trial end) anywhere else."""

    REFRESH_S = 1.0  # how often the elapsed time is redrawn between events

    def __init__(self, params: list[str], total_trials: int | None, console: Console | None = None):
        self.params, self.total_trials = list(params), total_trials
        self.console = console or Console()
        self.progress = SweepProgress(self.params, total_trials)
        self._live: Live | None = None
        self._drawn = 0.0

    # Tune pickles the RunConfig (and so this callback) into tuner.pkl for Tuner.restore: a
    # Console holds locks and a file, so a restored sweep gets a fresh console and state.
    def __getstate__(self) -> dict[str, Any]:
        return {"params": self.params, "total_trials": self.total_trials}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["params"], state["total_trials"])

    @property
    def live(self) -> bool:
        return self.console.is_interactive

    def setup(self, total_num_samples: int | None = None, **info) -> None:
        self.progress = SweepProgress(self.params, self.total_trials or total_num_samples)
        if self.live:
            # no refresh thread: Tune's loop calls on_step_end often, and redrawing there keeps
            # every read of the state on Tune's own thread
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.start()
            self._draw()

    def _sync(self, trials) -> None:
        """Rows for trials not seen yet: new pending ones, and a resumed sweep's earlier ones."""
        for t in trials:
            if t.trial_id in self.progress.trials:
                continue
            self.progress.add(t.trial_id, t.config)
            if t.status == "TERMINATED":
                self.progress.end(t.trial_id, t.last_result)
            elif t.status == "ERROR":
                self.progress.end(t.trial_id, t.last_result, error=_error_summary(t))

    def _draw(self) -> None:
        if self._live is not None:
            self._live.update(render_progress(self.progress), refresh=True)
            self._drawn = time.monotonic()

    def _say(self, line: str) -> None:
        if self._live is None:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def on_step_end(self, iteration: int, trials, **info) -> None:
        if len(trials) != len(self.progress.trials):
            self._sync(trials)
            self._draw()
        elif self._live is not None and time.monotonic() - self._drawn >= self.REFRESH_S:
            self._draw()

    def on_trial_start(self, iteration: int, trials, trial, **info) -> None:
        self._sync(trials)
        self.progress.start(trial.trial_id, trial.config)
        self._draw()

    # a trial retried after an error (FailureConfig.max_failures) comes back through restore
    on_trial_restore = on_trial_start

    def on_trial_result(self, iteration: int, trials, trial, result: dict, **info) -> None:
        row = self.progress.report(trial.trial_id, {"config": trial.config, **result})
        if row is not None:
            self._say(report_line(row))
        self._draw()

    def on_trial_complete(self, iteration: int, trials, trial, **info) -> None:
        row = self.progress.end(trial.trial_id, {"config": trial.config, **trial.last_result})
        self._say(end_line(row, self.progress))
        self._draw()

    def on_trial_error(self, iteration: int, trials, trial, **info) -> None:
        row = self.progress.end(
            trial.trial_id, {"config": trial.config, **trial.last_result}, _error_summary(trial)
        )
        self._say(end_line(row, self.progress))
        self._draw()

    def on_trial_recover(self, iteration: int, trials, trial, **info) -> None:
        # errored, and Tune will start it again: pending, with the error shown until it does
        row, error = self.progress.add(trial.trial_id, trial.config), _error_summary(trial)
        row.status, row.error = PENDING, f"retrying after {error}"
        self._say(f"trial {row.trial_id} failed at step {row.step}, retrying: {error}")
        self._draw()

    def on_experiment_end(self, trials, **info) -> None:
        self._sync(trials)
        if self._live is not None:
            self._draw()
            self._live.stop()  # leaves the last table on screen and the cursor shown
            self._live = None


def progress_callback(
    params: list[str], total_trials: int | None, console: Console | None = None
) -> SweepProgressCallback:
    """A Tune callback showing the sweep's trials (params: the swept keys, as in cfg.space)."""
    return SweepProgressCallback(params, total_trials, console)
