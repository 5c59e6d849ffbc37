"""After an API restart (and every few seconds while it runs): each unfinished job brought in
line with its Ray job. The runner writes a job's own progress; this covers what a runner cannot:
a Ray job never submitted (the API died between the row and the submit), a runner that died
without a word, and a cancel or pause whose Ray job is still running."""

from __future__ import annotations

import logging
import threading

from sqlalchemy import or_, select

from serve.finetuning import db
from serve.finetuning.launcher import RAY_DONE, Launcher

log = logging.getLogger("ray.serve")
LIVE = ("validating_files", "queued", "running")


def reconcile_job(sessions, launcher: Launcher, job: db.JobRow) -> str:
    """What was done for the job (for the log and the tests)."""
    ray_status = launcher.status(job.ray_job_id)
    if job.stop_pending:
        if ray_status in (None, *RAY_DONE):
            db.update_job(sessions, job.id, stop_pending=False)
            return "stopped"
        launcher.stop(job.ray_job_id)
        return "stopping"
    if job.status not in LIVE:
        return "nothing"
    if ray_status is None:
        launcher.submit(job.id, job.attempt, resume=job.attempt > 0)
        return "submitted"
    if ray_status in RAY_DONE:
        # The runner writes succeeded or failed itself; a Ray job that ended without it did not
        # get there (killed, out of memory, a lost node).
        tail = launcher.logs_tail(job.ray_job_id).strip().splitlines()
        cause = tail[-1][:300] if tail else "no log"
        error = {
            "code": "job_process_ended",
            "message": f"The job's Ray job ended ({ray_status}) before the job finished: {cause}",
            "param": None,
        }
        if db.set_status(sessions, job.id, "failed", only_from=LIVE, error=error):
            db.add_event(
                sessions, job.id, "failed", f"The job failed: {error['message']}", level="error"
            )
        return "failed"
    return "running"


def reconcile(sessions, launcher: Launcher) -> dict[str, str]:
    with sessions() as s:
        jobs = list(
            s.scalars(
                select(db.JobRow).where(
                    or_(db.JobRow.status.in_(LIVE), db.JobRow.stop_pending.is_(True))
                )
            )
        )
    done = {}
    for job in jobs:
        try:
            done[job.id] = reconcile_job(sessions, launcher, job)
        except Exception as e:  # the cluster unreachable: try again next round
            log.warning("reconciling %s failed: %s: %s", job.id, type(e).__name__, e)
            done[job.id] = "error"
    return done


class Reconciler:
    """reconcile() now and then every `every_s` seconds, on a daemon thread."""

    def __init__(self, sessions, launcher: Launcher, every_s: float):
        self.sessions, self.launcher, self.every_s = sessions, launcher, every_s
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="ft-reconcile")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            try:
                reconcile(self.sessions, self.launcher)
            except Exception as e:
                log.warning("reconcile failed: %s: %s", type(e).__name__, e)
            if self._stop.wait(self.every_s):
                return
