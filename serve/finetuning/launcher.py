"""Each fine-tuning job runs as a Ray job (the Ray Jobs API): `python -m serve.finetuning.runner
JOB_ID` on the cluster, which writes the job's status and events into the database itself. The
API only submits, stops and asks for the Ray job's status (after a restart: reconcile.py)."""

from __future__ import annotations

import logging
import os
import shlex

from serve.finetuning.config import FinetuningSettings

log = logging.getLogger("ray.serve")

DB_ENV = "RAYFT_FT_DATABASE_URL"  # the runner's database, never on its command line
# Ray job states after which its process no longer runs
RAY_DONE = ("SUCCEEDED", "FAILED", "STOPPED")


def dashboard_address(settings: FinetuningSettings) -> str:
    address = settings.ray_address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    if not address.startswith(("http://", "https://")):
        # a GCS address (host:6379, as RAY_ADDRESS inside a cluster): the dashboard's default port
        address = "http://" + address.split("://")[-1].rsplit(":", 1)[0] + ":8265"
    return address


class Launcher:
    def __init__(self, settings: FinetuningSettings, database_url: str):
        self.settings = settings
        self.database_url = database_url
        self._client = None

    @property
    def client(self):
        # Connecting asks the dashboard for its version: do it on first use, not at start-up.
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(dashboard_address(self.settings))
        return self._client

    def submit(self, job_id: str, attempt: int, resume: bool = False) -> str:
        """Start the job's runner; the Ray submission id is the job id and the attempt, so a
        retried submit after a crash cannot start a second runner for the same attempt."""
        submission_id = f"{job_id}-{attempt}"
        entrypoint = " ".join(
            shlex.quote(p)
            for p in [self.settings.python, "-m", "serve.finetuning.runner", job_id]
            + (["--resume"] if resume else [])
        )
        env = dict(self.settings.resolved_runtime_env())
        env["env_vars"] = {**env.get("env_vars", {}), DB_ENV: self.database_url}
        try:
            self.client.submit_job(
                entrypoint=entrypoint, submission_id=submission_id, runtime_env=env
            )
        except RuntimeError as e:
            if "already exists" not in str(e):
                raise
        return submission_id

    def stop(self, submission_id: str) -> None:
        """Best effort: the job's stop_pending flag makes reconcile stop it again until Ray
        says it has ended (the cluster may be unreachable right now)."""
        try:
            self.client.stop_job(submission_id)
        except Exception as e:
            log.info("stopping Ray job %s: %s", submission_id, type(e).__name__)

    def status(self, submission_id: str) -> str | None:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED; None when the cluster has no such job."""
        try:
            return str(self.client.get_job_status(submission_id).value)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                return None
            raise

    def logs_tail(self, submission_id: str, chars: int = 2000) -> str:
        try:
            return self.client.get_job_logs(submission_id)[-chars:]
        except RuntimeError:
            return ""
