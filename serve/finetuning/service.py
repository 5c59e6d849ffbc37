"""What the fine-tuning routes do, always for one tenant: another tenant's files, jobs, events,
checkpoints and models are 404s, the same as ones that do not exist."""

from __future__ import annotations

import logging
from typing import Any, BinaryIO

from pydantic import ValidationError
from sqlalchemy import func, select

from serve.errors import ApiError, InvalidRequest, ModelNotFound, RateLimited
from serve.finetuning import db, models, views
from serve.finetuning.config import FinetuningSettings, JobRequest
from serve.finetuning.files import FileStore, TooLarge
from serve.finetuning.launcher import Launcher
from serve.finetuning.params import build_job_config, local_path
from serve.names import ModelName

log = logging.getLogger("ray.serve")


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, what: str, object_id: str, param: str = "id"):
        super().__init__(f"No such {what}: {object_id}", param=param)


def validation_error(e: ValidationError) -> InvalidRequest:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = f"Unknown parameter: '{param}'."
    return InvalidRequest(f"Invalid value for '{param}': {message}", param=param)


def cursor(sessions, model, object_id: str | None, tenant: str, param: str = "after") -> int | None:
    """The ordinal of the `after` object (the tenant's own), or None for the first page."""
    if object_id is None:
        return None
    with sessions() as s:
        row = s.get(model, object_id)
    if row is None or row.tenant != tenant:
        raise NotFound("object", object_id, param)
    return row.ordinal


def check_limit(limit: int) -> int:
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit must be between 1 and 100", param="limit")
    return limit


class FineTuning:
    def __init__(self, settings: FinetuningSettings, registry: str | None, max_lora_rank: int):
        if registry is None:
            raise ValueError(
                "finetuning: needs a registry (the fine-tuned models are promoted there)"
            )
        self.settings = settings
        self.registry_root = registry if "://" in registry else local_path(registry)
        self.max_lora_rank = max_lora_rank
        self.sessions = db.connect(settings.database_url)
        self.store = FileStore(settings.files)
        self.launcher = Launcher(settings, settings.database_url)

    # ------------------------------------------------------------------ files
    def create_file(
        self, tenant: str, src: BinaryIO, filename: str, purpose: str, size: int | None
    ) -> dict:
        if purpose != "fine-tune":
            raise InvalidRequest(
                f"purpose '{purpose}' is not supported here: upload files with purpose 'fine-tune'",
                param="purpose",
            )
        limits = self.settings.limits_for(tenant)
        room = limits.max_total_bytes - self.bytes_used(tenant)
        cap = min(limits.max_file_bytes, room)
        if size is not None and size > cap or cap <= 0:
            raise self.too_large(limits, room)
        file_id = db.new_id("file")
        try:
            written, sha = self.store.put(tenant, file_id, src, cap)
        except TooLarge:
            raise self.too_large(limits, room) from None
        row = db.FileRow(
            id=file_id,
            tenant=tenant,
            filename=filename[:512],
            purpose=purpose,
            bytes=written,
            sha256=sha,
            uri=self.store.uri(tenant, file_id),
            created_at=db.now(),
            ordinal=db.ordinal(),
        )
        with db.transaction(self.sessions) as s:
            s.add(row)
        return views.file_object(row)

    @staticmethod
    def too_large(limits, room: int) -> InvalidRequest:
        if room < limits.max_file_bytes:
            return InvalidRequest(
                f"this file would take your files over their limit of {limits.max_total_bytes} "
                f"bytes in all ({max(room, 0)} bytes left): delete files first",
                param="file",
                code="storage_limit_exceeded",
            )
        return InvalidRequest(
            f"the file is larger than the limit of {limits.max_file_bytes} bytes",
            param="file",
            code="file_too_large",
        )

    def bytes_used(self, tenant: str) -> int:
        with self.sessions() as s:
            return s.scalar(
                select(func.coalesce(func.sum(db.FileRow.bytes), 0)).where(
                    db.FileRow.tenant == tenant
                )
            )

    def file_row(self, tenant: str, file_id: str, param: str = "file_id") -> db.FileRow:
        with self.sessions() as s:
            row = s.get(db.FileRow, file_id)
        if row is None or row.tenant != tenant:
            raise NotFound("File object", file_id, param)
        return row

    def list_files(
        self, tenant: str, after: str | None, limit: int, order: str, purpose: str | None
    ) -> dict:
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be 'asc' or 'desc'", param="order")
        start = cursor(self.sessions, db.FileRow, after, tenant)
        q = select(db.FileRow).where(db.FileRow.tenant == tenant)
        if purpose:
            q = q.where(db.FileRow.purpose == purpose)
        if start is not None:
            q = q.where(
                db.FileRow.ordinal < start if order == "desc" else db.FileRow.ordinal > start
            )
        key = db.FileRow.ordinal.desc() if order == "desc" else db.FileRow.ordinal
        return self._page(q.order_by(key), check_limit(limit), views.file_object)

    def _page(self, query, limit: int, view) -> dict:
        with self.sessions() as s:
            rows = list(s.scalars(query.limit(limit + 1)))
        return views.page([view(r) for r in rows[:limit]], len(rows) > limit)

    def delete_file(self, tenant: str, file_id: str) -> dict:
        row = self.file_row(tenant, file_id)
        with db.transaction(self.sessions) as s:
            s.delete(s.get(db.FileRow, file_id))
        self.store.delete(row.uri)
        return {"id": file_id, "object": "file", "deleted": True}

    # ------------------------------------------------------------------ jobs
    def job_row(self, tenant: str, job_id: str) -> db.JobRow:
        with self.sessions() as s:
            row = s.get(db.JobRow, job_id)
        if row is None or row.tenant != tenant:
            raise NotFound("fine-tuning job", job_id, "fine_tuning_job_id")
        return row

    def parse_job(self, body: Any) -> JobRequest:
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        try:
            return JobRequest.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from None

    def check_job_request(self, tenant: str, req: JobRequest) -> tuple:
        if req.model not in self.settings.base_models:
            known = ", ".join(sorted(self.settings.base_models))
            raise InvalidRequest(
                f"Model '{req.model}' is not available for fine-tuning here (available: {known})",
                param="model",
                code="model_not_available",
            )
        if req.integrations:
            raise InvalidRequest(
                "integrations are not supported by this server", param="integrations"
            )
        files = []
        for param, file_id in (
            ("training_file", req.training_file),
            ("validation_file", req.validation_file),
        ):
            if file_id is None:
                files.append(None)
                continue
            try:
                row = self.file_row(tenant, file_id, param)
            except NotFound:
                raise InvalidRequest(
                    f"{param}: no such file: {file_id}", param=param, code="invalid_file"
                ) from None
            if row.purpose != "fine-tune":
                raise InvalidRequest(
                    f"{param}: file {file_id} has purpose '{row.purpose}', not 'fine-tune'",
                    param=param,
                )
            files.append(row)
        return files[0], files[1]

    def check_concurrency(self, tenant: str) -> None:
        limit = self.settings.limits_for(tenant).max_concurrent_jobs
        with self.sessions() as s:
            active = s.scalar(
                select(func.count())
                .select_from(db.JobRow)
                .where(db.JobRow.tenant == tenant, db.JobRow.status.in_(db.ACTIVE))
            )
        if active >= limit:
            raise RateLimited(
                f"You have {active} fine-tuning jobs in progress, the limit is {limit}: wait for "
                "one to finish or cancel one",
                code="too_many_jobs",
                headers={"Retry-After": "30"},
            )

    def create_job(self, tenant: str, body: Any) -> dict:
        req = self.parse_job(body)
        train, valid = self.check_job_request(tenant, req)
        self.check_concurrency(tenant)
        job_id = db.new_id("ftjob")
        entry = self.settings.base_models[req.model]
        cfg, method, seed = build_job_config(
            req,
            entry,
            job_id,
            local_path(self.settings.runs),
            train.uri,
            valid.uri if valid else None,
        )
        row = self.new_job_row(tenant, req, job_id, cfg, method, seed, entry)
        with db.transaction(self.sessions) as s:  # the job and its first event, or neither
            s.add(row)
            s.flush()
            s.add(db.first_event(job_id, "created", f"Created fine-tuning job: {job_id}"))
        self.start(row)
        return views.job_object(db.get_job(self.sessions, job_id))

    def new_job_row(self, tenant, req: JobRequest, job_id, cfg, method, seed, entry) -> db.JobRow:
        runner = {
            "registry": self.registry_root,
            "files": self.store.root,
            "eval": local_path(entry.eval) if entry.eval else None,
            "gate": req.rayft.gate,
            "max_lora_rank": self.max_lora_rank,
            "progress_every_s": self.settings.progress_every_s,
        }
        return db.JobRow(
            id=job_id,
            tenant=tenant,
            model=req.model,
            training_file=req.training_file,
            validation_file=req.validation_file,
            suffix=req.suffix,
            seed=seed,
            user_metadata=req.metadata,
            method=method,
            job_config=cfg.model_dump(mode="json"),
            runner=runner,
            status="validating_files",
            created_at=db.now(),
            result_files=[],
            ray_job_id=f"{job_id}-0",
            attempt=0,
            ordinal=db.ordinal(),
        )

    def start(self, row: db.JobRow, resume: bool = False) -> None:
        """Submit the job's Ray job. A failure here leaves the job as it is: reconcile submits
        it again (the same submission id, so never twice)."""
        try:
            self.launcher.submit(row.id, row.attempt, resume=resume)
        except Exception as e:
            log.warning("submitting %s failed (reconcile retries): %s", row.id, type(e).__name__)

    def list_jobs(self, tenant: str, after: str | None, limit: int, metadata: dict | None) -> dict:
        start = cursor(self.sessions, db.JobRow, after, tenant)
        q = select(db.JobRow).where(db.JobRow.tenant == tenant)
        if start is not None:
            q = q.where(db.JobRow.ordinal < start)
        rows = self._page(
            q.order_by(db.JobRow.ordinal.desc()),
            check_limit(limit) if not metadata else 10_000,
            views.job_object,
        )
        if metadata:  # metadata is JSON: filtered here, for every database alike
            data = [
                j
                for j in rows["data"]
                if all((j["metadata"] or {}).get(k) == v for k, v in metadata.items())
            ]
            return views.page(data[:limit], len(data) > limit)
        return rows

    def get_job(self, tenant: str, job_id: str) -> dict:
        return views.job_object(self.job_row(tenant, job_id))

    def cancel(self, tenant: str, job_id: str) -> dict:
        row = self.job_row(tenant, job_id)
        if not db.set_status(
            self.sessions,
            job_id,
            "cancelled",
            only_from=db.ACTIVE,
            stop_pending=True,
            estimated_finish=None,
        ):
            raise InvalidRequest(
                f"Job {job_id} is already {row.status}: it cannot be cancelled",
                param="fine_tuning_job_id",
            )
        db.add_event(self.sessions, job_id, "cancelled", "The job was cancelled")
        self.launcher.stop(row.ray_job_id)
        return self.get_job(tenant, job_id)

    def pause(self, tenant: str, job_id: str) -> dict:
        row = self.job_row(tenant, job_id)
        if not db.set_status(
            self.sessions,
            job_id,
            "paused",
            only_from=("running",),
            stop_pending=True,
            estimated_finish=None,
        ):
            raise InvalidRequest(
                f"Job {job_id} is {row.status}: only a running job can be paused",
                param="fine_tuning_job_id",
            )
        db.add_event(
            self.sessions,
            job_id,
            f"paused-{row.attempt}",
            "The job was paused (it resumes from its last checkpoint)",
        )
        self.launcher.stop(row.ray_job_id)
        return self.get_job(tenant, job_id)

    def resume(self, tenant: str, job_id: str) -> dict:
        row = self.job_row(tenant, job_id)
        if row.status != "paused":
            raise InvalidRequest(
                f"Job {job_id} is {row.status}: only a paused job can be resumed",
                param="fine_tuning_job_id",
            )
        if self.launcher.status(row.ray_job_id) not in (None, "SUCCEEDED", "FAILED", "STOPPED"):
            raise RateLimited(
                "The job is still pausing: retry in a few seconds",
                code="still_pausing",
                headers={"Retry-After": "5"},
            )
        attempt = row.attempt + 1
        if not db.set_status(
            self.sessions,
            job_id,
            "queued",
            only_from=("paused",),
            attempt=attempt,
            ray_job_id=f"{job_id}-{attempt}",
            stop_pending=False,
        ):
            raise InvalidRequest(f"Job {job_id} is no longer paused", param="fine_tuning_job_id")
        db.add_event(self.sessions, job_id, f"resumed-{attempt}", "The job was resumed")
        self.start(db.get_job(self.sessions, job_id), resume=True)
        return self.get_job(tenant, job_id)

    # ------------------------------------------------------------------ events, checkpoints
    def list_events(self, tenant: str, job_id: str, after: str | None, limit: int) -> dict:
        """Newest first, as OpenAI lists them; `after` is an event id of this job."""
        self.job_row(tenant, job_id)
        q = select(db.EventRow).where(db.EventRow.job_id == job_id)
        if after is not None:
            q = q.where(db.EventRow.seq < self.event_seq(job_id, after))
        return self._page(
            q.order_by(db.EventRow.seq.desc()), check_limit(limit), views.event_object
        )

    def event_seq(self, job_id: str, event_id: str) -> int:
        with self.sessions() as s:
            row = s.get(db.EventRow, event_id)
        if row is None or row.job_id != job_id:
            raise NotFound("event", event_id, "after")
        return row.seq

    def events_since(self, tenant: str, job_id: str, seq: int) -> tuple[list[db.EventRow], bool]:
        """Events after `seq`, oldest first, and whether the job has ended (for the stream)."""
        row = self.job_row(tenant, job_id)
        with self.sessions() as s:
            events = list(
                s.scalars(
                    select(db.EventRow)
                    .where(db.EventRow.job_id == job_id, db.EventRow.seq > seq)
                    .order_by(db.EventRow.seq)
                )
            )
        return events, row.status in db.TERMINAL

    def list_checkpoints(self, tenant: str, job_id: str, after: str | None, limit: int) -> dict:
        self.job_row(tenant, job_id)
        q = select(db.CheckpointRow).where(db.CheckpointRow.job_id == job_id)
        if after is not None:
            with self.sessions() as s:
                ckpt = s.get(db.CheckpointRow, after)
            if ckpt is None or ckpt.job_id != job_id:
                raise NotFound("checkpoint", after, "after")
            q = q.where(db.CheckpointRow.step < ckpt.step)
        return self._page(
            q.order_by(db.CheckpointRow.step.desc()), check_limit(limit), views.checkpoint_object
        )

    # ------------------------------------------------------------------ models, for the gateway
    def model_name(self, model: str, tenant: str) -> ModelName:
        """The registry name (and alias) an ft: id serves, for its owner only: a job that has
        succeeded, or a checkpoint recorded for it. Anything else is the usual 404."""
        parsed = models.parse(model)
        if parsed is None:
            raise ModelNotFound(model)
        with self.sessions() as s:
            job = s.get(db.JobRow, parsed.job_id)
            if job is None or job.tenant != tenant:
                raise ModelNotFound(model)
            if parsed.selector is None:
                if job.status != "succeeded" or job.fine_tuned_model != model:
                    raise ModelNotFound(model)
            elif not s.scalar(
                select(db.CheckpointRow.id).where(db.CheckpointRow.model_id == model)
            ):
                raise ModelNotFound(model)
        return ModelName(parsed.registry_name, parsed.selector)

    def owned_models(self, tenant: str) -> list[str]:
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(db.JobRow.fine_tuned_model)
                    .where(db.JobRow.tenant == tenant, db.JobRow.status == "succeeded")
                    .order_by(db.JobRow.ordinal)
                )
            )
