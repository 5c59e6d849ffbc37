"""Submit a fine-tuning job to a Ray cluster and follow it, like `ray job submit` but checked first.

    python -m cluster.submit CONFIG.yaml [key.sub=value ...] [--address URL] [--no-wait] [--pip]

The config (with its overrides) is validated on the laptop before anything is uploaded; the job
runs `python -m jobs.finetune CONFIG [overrides]` in cluster/runtime_env.yaml's environment. The
exit code is the job's: 0 when it succeeded, 1 when it failed or was stopped, 2 for a bad config.
The address defaults to RAY_ADDRESS, else the dashboard that `ray dashboard cluster.yaml` forwards.
With token auth (every cluster of ours), RAY_AUTH_MODE=token and the token must be in the
environment or ~/.ray/auth_token.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from pathlib import Path
from typing import Annotated

import typer
import yaml

from core import cli
from core.config import ConfigError
from jobs.config import load_config

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
# What a job needs on a node, pinned: no test or lint tools, no GPU extras (the node's set-up).
RUNTIME_REQUIREMENTS = REPO / "requirements" / "runtime.txt"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def build_runtime_env(pip: bool) -> dict:
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    env["working_dir"] = str((REPO / env.get("working_dir", ".")).resolve())
    if pip:
        env["pip"] = str(RUNTIME_REQUIREMENTS)
    return env


async def follow_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit(config: Path, overrides: list[str], address: str, wait: bool, pip: bool) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    cfg = load_config(config, overrides)
    try:  # the job reads the config from the uploaded working directory
        config = config.resolve().relative_to(REPO)
    except ValueError:
        raise ConfigError(
            f"{config}: the config must be inside {REPO}, which is what gets uploaded"
        ) from None
    client = JobSubmissionClient(address)
    entrypoint = shlex.join(["python", "-m", "jobs.finetune", str(config), *overrides])
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env=build_runtime_env(pip),
        submission_id=f"rayft-{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        metadata={"run_name": cfg.run.name, "config": str(config)},
    )
    print(f"submitted {job_id} to {address}")
    print(f"  status: ray job status --address {address} {job_id}")
    print(f"  logs:   ray job logs --address {address} --follow {job_id}")
    print(f"  stop:   ray job stop --address {address} {job_id}")
    if not wait:
        return 0
    try:
        asyncio.run(follow_logs(client, job_id))
    except KeyboardInterrupt:
        stop = f"ray job stop --address {address} {job_id}"
        print(f"\nstopped following; the job goes on. To stop it: {stop}")
        return 130
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def main(
    config: Annotated[Path, typer.Argument(help="job YAML, e.g. configs/quickstart.yaml")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted overrides: train.lr=1e-4")
    ] = None,
    address: Annotated[
        str, typer.Option(envvar="RAY_ADDRESS", help="the cluster's dashboard URL")
    ] = DEFAULT_ADDRESS,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="return once submitted")] = False,
    pip: Annotated[
        bool, typer.Option("--pip", help="install requirements/runtime.txt in the job's env")
    ] = False,
) -> None:
    raise typer.Exit(submit(config, overrides or [], address, not no_wait, pip))


if __name__ == "__main__":
    cli.run(main)
