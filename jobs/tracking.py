"""Experiment tracking from rank 0 of the Ray Train workers: wandb, MLflow or nothing.

    tracker = start_tracker(cfg, run_info, total_steps)   # every rank; only rank 0 tracks
    tracker.log({"train/loss": 1.9, "train/lr": 2e-3}, step)
    tracker.log_checkpoint("runs/NAME/checkpoint_000050", step)
    tracker.summary(final_metrics)
    tracker.finish()

`run_info` is computed once on the driver (`tracking_run_info`): the run's key, the dataset hash
and the code's commit. A run is identified by its checkpoint directory (storage path + run.name),
so a restarted or re-run job continues the same tracker run: wandb gets a deterministic run id with
`resume="allow"`, MLflow finds its run by the `rayft.run_key` tag.

Failures never cost the training run by default: a tracker that cannot start (no network, a bad
URI, no credentials, the library missing) or that fails later is reported once as a warning and
the job goes on untracked. With `tracking.required: true` a tracker that cannot start fails the
job before its first step instead (a failure later still only warns: by then the work is worth
more than its record). Logged configs are redacted and error messages scrubbed (jobs.run_record).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from jobs.config import JobConfig
from jobs.run_record import git_state, hardware, library_versions, redact, scrub

logger = logging.getLogger(__name__)


class TrackerStartError(RuntimeError):
    """The tracker could not start and tracking.required is set."""


class Tracker:
    """No tracking: every method does nothing (backend none, ranks other than 0, a failed start)."""

    backend = "none"

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_checkpoint(self, path: str, step: int) -> None:
        pass

    def summary(self, final: dict[str, Any]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # An exception leaves the run marked failed, not running forever in the tracker's UI.
        self.finish(failed=exc_type is not None)


class _GuardedTracker(Tracker):
    """A backend whose calls never raise: the first failure is logged (scrubbed) and turns
    tracking off for the rest of the run."""

    def __init__(self) -> None:
        self.off = False  # after a failure or finish()

    def _guard(self, what: str, fn, *args) -> None:
        if self.off:
            return
        try:
            fn(*args)
        except Exception as e:
            self.off = True
            logger.warning(
                "tracking (%s) failed in %s, the run goes on untracked: %s",
                self.backend,
                what,
                scrub(f"{type(e).__name__}: {e}"),
            )

    def log(self, metrics, step):
        self._guard("log", self._log, metrics, step)

    def log_checkpoint(self, path, step):
        self._guard("log_checkpoint", self._log_checkpoint, str(path), step)

    def summary(self, final):
        self._guard("summary", self._summary, final)

    def finish(self, failed=False):
        self._guard("finish", self._finish, failed)
        self.off = True


# ------------------------------------------------------------------------ wandb


class WandbTracker(_GuardedTracker):
    """A wandb run with a deterministic id. Offline mode writes everything into the run
    directory's .wandb file (read back by `read_wandb_run`); `wandb sync DIR` uploads it later."""

    backend = "wandb"

    def __init__(self, cfg: JobConfig, info: dict, total_steps: int, wandb_dir: str) -> None:
        super().__init__()
        import wandb

        tracking = cfg.tracking
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=tracking.project,
            entity=tracking.entity,
            id=wandb_run_id(info["run_key"], cfg.run.name),
            name=cfg.run.name,
            resume="allow",
            mode=os.environ.get("WANDB_MODE") or tracking.mode,
            dir=wandb_dir,
            config=tracked_config(cfg, info, total_steps),
            tags=[f"{k}={v}"[:64] for k, v in run_tags(cfg, info, total_steps).items()],
            # Ray keeps the workers' output; wandb's console capture would copy it (and anything a
            # library prints) into the tracker.
            settings=wandb.Settings(console="off", init_timeout=60),
        )
        self.checkpoints: list[dict] = list(self.run.summary.get("checkpoints") or [])

    def _log(self, metrics, step):
        self.run.log({k: float(v) for k, v in metrics.items()}, step=step)

    def _log_checkpoint(self, path, step):
        self.checkpoints.append({"step": step, "path": path})
        self.run.summary["checkpoints"] = self.checkpoints
        self.run.summary["last_checkpoint"] = path

    def _summary(self, final):
        self.run.summary.update({f"final/{k}": v for k, v in final.items()})

    def _finish(self, failed):
        self.run.finish(exit_code=1 if failed else 0)
        wait_for_wandb_file(self.run.settings.sync_file)


def wait_for_wandb_file(path: str | Path, timeout_s: float = 60.0) -> None:
    """Wait until the run's .wandb file holds its exit record. `run.finish()` can return before
    wandb's service has written the file's last block (seen under load: the file ended inside the
    run record, so a reader right after finish saw no run); `wandb sync` or a reader then gets a
    partial run."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if read_wandb_run(path)["exit_code"] is not None:
                return
        except (OSError, ValueError):  # not there yet, or its tail is mid-write
            pass
        if time.monotonic() > deadline:
            logger.warning(
                "%s: wandb has not written the run's exit record after %.0f s", path, timeout_s
            )
            return
        time.sleep(0.05)


def wandb_run_id(run_key: str, run_name: str) -> str:
    """A wandb run id from the run key: readable, within wandb's 64 characters and its alphabet."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:48]
    return f"{readable}-{run_key[:12]}"


# ------------------------------------------------------------------------ MLflow


class MlflowTracker(_GuardedTracker):
    """An MLflow run in experiment `tracking.project`, found again by its `rayft.run_key` tag.
    Metrics are logged asynchronously, one batch in flight: a slow tracking server costs a step
    at most the wait for the previous log interval's batch."""

    backend = "mlflow"
    RUN_KEY_TAG = "rayft.run_key"

    def __init__(self, cfg: JobConfig, info: dict, total_steps: int) -> None:
        super().__init__()
        uri = cfg.tracking.tracking_uri
        if uri and is_local_path_uri(uri):
            # MLflow 3 refuses a directory store unless asked (it prefers a database); a directory
            # is what tracking_uri names here, so ask.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = Path(uri.removeprefix("file://")).expanduser().resolve().as_uri()
        # A tracking server that does not answer: fail within seconds, not MLflow's default of
        # minutes of retries per request (the user's own settings win).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(cfg.tracking.project)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else self.client.create_experiment(cfg.tracking.project)
        )
        key = info["run_key"]
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{self.RUN_KEY_TAG}` = '{key}'", max_results=1
        )
        tags = {self.RUN_KEY_TAG: key, **run_tags(cfg, info, total_steps)}
        if info["code"]["sha"]:  # the commit MLflow's UI shows for a run
            tags["mlflow.source.git.commit"] = info["code"]["sha"]
        config = tracked_config(cfg, info, total_steps)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            logged = found[0].data.params
        else:
            self.run_id = self.client.create_run(
                experiment_id, run_name=cfg.run.name, tags=tags
            ).info.run_id
            logged = {}
        # Params cannot change in MLflow: a re-run logs the ones it adds and keeps the first values;
        # config.json (an artifact) is the current run's whole config.
        params = {k: v for k, v in flat_params(config).items() if k not in logged}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit is 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.client.log_dict(self.run_id, config, "config.json")
        self.pending: list = []

    def _log(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        # One batch in flight at a time: MLflow's async writer runs batches on a thread pool, and
        # two of one run appending to a file store at once lost a point (seen in CI under load).
        if self.pending:
            self.pending.pop().wait()
        self.pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def _log_checkpoint(self, path, step):
        self.client.set_tag(self.run_id, f"rayft.checkpoint.{step:06d}", path)
        self.client.set_tag(self.run_id, "rayft.last_checkpoint", path)

    def _summary(self, final):
        numbers = {f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float))}
        self._log(numbers, int(final.get("step", 0)))

    def _finish(self, failed):
        try:
            for operation in self.pending:
                operation.wait()  # raises the first failed async log, if any
        finally:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def is_local_path_uri(uri: str) -> bool:
    return uri.startswith("file://") or "://" not in uri and ":" not in uri.split("/")[0]


# ------------------------------------------------------------------------ what is logged


def tracking_run_info(cfg: JobConfig, dataset_hash: str) -> dict:
    """Computed on the driver, passed to the workers: what identifies the run and its inputs."""
    run_dir = f"{cfg.checkpoint.storage_path.rstrip('/')}/{cfg.run.name}"
    return {
        "run_key": hashlib.sha256(run_dir.encode()).hexdigest()[:16],
        "run_dir": run_dir,
        "dataset_hash": dataset_hash,
        "code": git_state(),
    }


def run_tags(cfg: JobConfig, info: dict, total_steps: int) -> dict[str, str]:
    """The run's tags: what one filters runs by. The user's tracking.tags win on a clash."""
    tags = {
        "run_name": cfg.run.name,
        "base_model": cfg.model.name_or_path,
        "dataset_hash": info["dataset_hash"],
        "method": "lora" if cfg.lora else "full",
        "objective": cfg.train.method,
        "lora_r": cfg.lora.r if cfg.lora else None,
        "lora_alpha": cfg.lora.alpha if cfg.lora else None,
        "lr": cfg.train.lr,
        "steps": total_steps,
        "strategy": cfg.train.strategy,
        "git_sha": info["code"]["sha"],
        "git_dirty": info["code"]["dirty"],
        "seed": cfg.run.seed,
    }
    tags = {k: str(v) for k, v in tags.items() if v is not None}
    return {**tags, **redact(cfg.tracking.tags)}


def tracked_config(cfg: JobConfig, info: dict, total_steps: int) -> dict:
    """The job's config (secrets redacted) plus the run's provenance: the same facts as run.json,
    measured on the rank-0 worker that trains."""
    return redact(
        {
            **cfg.model_dump(mode="json"),
            "provenance": {
                "run_dir": info["run_dir"],
                "dataset_hash": info["dataset_hash"],
                "total_steps": total_steps,
                "code": info["code"],
                "libraries": library_versions(),
                "hardware": hardware(),
            },
        }
    )


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """Dotted keys → string values (MLflow params), each within MLflow's 6000 characters."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:6000]
    return out


# ------------------------------------------------------------------------ start


def start_tracker(cfg: JobConfig, info: dict, total_steps: int) -> Tracker:
    """The run's tracker on rank 0, a no-op elsewhere. A start failure warns and returns the no-op
    tracker, or raises TrackerStartError when tracking.required is set."""
    from inference.runtime import rank_and_world

    backend = cfg.tracking.backend
    if backend == "none" or rank_and_world()[0] != 0:
        return Tracker()
    try:
        if backend == "wandb":
            return WandbTracker(cfg, info, total_steps, wandb_dir(info))
        return MlflowTracker(cfg, info, total_steps)
    except Exception as e:
        message = f"tracking.backend {backend} did not start: {scrub(f'{type(e).__name__}: {e}')}"
        if cfg.tracking.required:
            raise TrackerStartError(f"{message} (tracking.required is set)") from None
        logger.warning(
            "%s; the run goes on untracked (tracking.required: true fails instead)", message
        )
        return Tracker()


def wandb_dir(info: dict) -> str:
    """Where wandb writes its files: WANDB_DIR when set, else beside the checkpoints when they
    are on a local disk (an offline run stays with its run), else ~/.cache/rayft/wandb on the
    rank-0 node (not the working directory: Ray deletes a job's working_dir copy)."""
    if os.environ.get("WANDB_DIR"):
        return os.environ["WANDB_DIR"]
    if is_local_path_uri(info["run_dir"]):
        return info["run_dir"].removeprefix("file://")
    return str(Path.home() / ".cache" / "rayft" / "wandb")


# ------------------------------------------------------------------------ reading a wandb run back


def read_wandb_run(path: str | Path) -> dict:
    """An offline wandb run read back from its `.wandb` file (a run directory or the file): run id,
    project, tags, config, history rows, summary and exit code, as `wandb sync` would upload them.

    wandb 0.31 writes no wandb-summary.json/config.yaml offline (wandb/wandb#9646) and has no
    Python reader: the file is wandb's LevelDB-style log (a 7-byte header, 32 KiB blocks of records
    with a CRC32 of type + data, records split FIRST/MIDDLE/LAST across blocks), each record a
    `wandb_internal_pb2.Record`.
    """
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    if path.is_dir():
        (path,) = path.glob("*.wandb")
    run = {
        "run_id": None,
        "project": None,
        "tags": [],
        "config": {},
        "history": [],
        "summary": {},
        "exit_code": None,
    }
    for data in _wandb_log_records(path.read_bytes(), path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(run_id=record.run.run_id, project=record.run.project)
            run["tags"] = list(record.run.tags)
            _apply(run["config"], record.run.config.update)
        elif kind == "config":
            _apply(run["config"], record.config.update)
        elif kind == "history":
            row: dict = {}
            _apply(row, record.history.item)
            run["history"].append(row)
        elif kind == "summary":
            _apply(run["summary"], record.summary.update)
            for item in record.summary.remove:
                run["summary"].pop(item.key or item.nested_key[0], None)
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def _apply(target: dict, items) -> None:
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = target
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)


def _wandb_log_records(blob: bytes, path: Path):
    import struct
    import zlib

    block, header = 32768, 7
    if blob[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file (header {blob[:7]!r})")
    pos, parts = header, None
    while pos + header <= len(blob):
        if block - pos % block < header:  # a block's tail too short for a record header: padding
            pos += block - pos % block
            continue
        checksum, length, kind = struct.unpack("<IHB", blob[pos : pos + header])
        data = blob[pos + header : pos + header + length]
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += block - pos % block
            continue
        if zlib.crc32(bytes([kind]) + data) != checksum or len(data) != length:
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        pos += header + length
        if kind == 1:  # FULL
            yield data
        elif kind == 2:  # FIRST
            parts = data
        elif kind == 3:  # MIDDLE
            parts += data
        elif kind == 4:  # LAST
            yield parts + data
            parts = None
    if parts is not None:
        raise ValueError(f"{path}: ends inside a record at byte {len(blob)} (still being written?)")
