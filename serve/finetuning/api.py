"""The fine-tuning routes, in OpenAI's shapes: /v1/files and /v1/fine_tuning/jobs. Mounted on the
serving app (serve/app.py), which authenticates with the same tenants and installs the service
here when its settings have a `finetuning` section; without one these routes are 404s."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve.errors import ApiError, InvalidRequest
from serve.finetuning.service import FineTuning
from serve.finetuning.views import event_object, file_object
from serve.tenants import Tenants

DEFAULT_TENANT = "default"  # allow_unauthenticated: everything belongs to one tenant


class Installed:
    """The replica's service and tenants (one replica is one process)."""

    service: FineTuning | None = None
    tenants: Tenants | None = None


installed = Installed()
router = APIRouter(prefix="/v1")


def install(service: FineTuning | None, tenants: Tenants | None) -> None:
    installed.service, installed.tenants = service, tenants


def tenant_of(request: Request) -> tuple[FineTuning, str]:
    if installed.service is None:
        raise _not_found()
    if installed.tenants is None:
        return installed.service, DEFAULT_TENANT
    return installed.service, installed.tenants.authenticate(
        request.headers.get("authorization")
    ).name


def _not_found() -> ApiError:
    error = InvalidRequest("Not Found", code="not_found")
    error.status = 404
    return error


def query(request: Request, allowed: set[str]) -> dict[str, str]:
    """The query parameters, every one of them known (metadata[KEY] aside)."""
    params = dict(request.query_params)
    unknown = [k for k in params if k not in allowed and not k.startswith("metadata[")]
    if unknown:
        raise InvalidRequest(f"Unknown parameter: '{unknown[0]}'.", param=unknown[0])
    return params


def int_param(params: dict, name: str, default: int) -> int:
    try:
        return int(params.get(name, default))
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer", param=name) from None


async def call(fn: Callable, *args) -> JSONResponse:
    """The service's blocking database and storage work off the event loop."""
    return JSONResponse(await asyncio.to_thread(fn, *args))


# ---------------------------------------------------------------------- files


@router.post("/files")
async def create_file(request: Request) -> JSONResponse:
    service, tenant = tenant_of(request)
    form = await request.form()
    upload, purpose = form.get("file"), form.get("purpose")
    if upload is None or isinstance(upload, str):
        raise InvalidRequest("'file' is required (a multipart file field)", param="file")
    if not isinstance(purpose, str) or not purpose:
        raise InvalidRequest("'purpose' is required", param="purpose")
    unknown = [k for k in form if k not in ("file", "purpose")]
    if unknown:
        raise InvalidRequest(f"Unknown parameter: '{unknown[0]}'.", param=unknown[0])
    try:
        return await call(
            service.create_file,
            tenant,
            upload.file,
            upload.filename or "upload",
            purpose,
            upload.size,
        )
    finally:
        await upload.close()


@router.get("/files")
async def list_files(request: Request) -> JSONResponse:
    service, tenant = tenant_of(request)
    q = query(request, {"after", "limit", "order", "purpose"})
    limit = int_param(q, "limit", 100)
    return await call(
        service.list_files, tenant, q.get("after"), limit, q.get("order", "desc"), q.get("purpose")
    )


@router.get("/files/{file_id}")
async def retrieve_file(file_id: str, request: Request) -> JSONResponse:
    service, tenant = tenant_of(request)
    return JSONResponse(file_object(await asyncio.to_thread(service.file_row, tenant, file_id)))


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> JSONResponse:
    service, tenant = tenant_of(request)
    return await call(service.delete_file, tenant, file_id)


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> Response:
    service, tenant = tenant_of(request)
    row = await asyncio.to_thread(service.file_row, tenant, file_id)
    data = b"".join(await asyncio.to_thread(lambda: list(service.store.read(row.uri))))
    return Response(data, media_type="application/octet-stream")


# ---------------------------------------------------------------------- jobs


@router.post("/fine_tuning/jobs")
async def create_job(request: Request) -> JSONResponse:
    service, tenant = tenant_of(request)
    try:
        body = json.loads(await request.body() or b"null")
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e.msg}") from None
    return await call(service.create_job, tenant, body)


@router.get("/fine_tuning/jobs")
async def list_jobs(request: Request) -> JSONResponse:
    service, tenant = tenant_of(request)
    q = query(request, {"after", "limit"})
    metadata = {k[len("metadata[") : -1]: v for k, v in q.items() if k.startswith("metadata[")}
    return await call(
        service.list_jobs, tenant, q.get("after"), int_param(q, "limit", 20), metadata or None
    )


@router.get("/fine_tuning/jobs/{job_id}")
async def retrieve_job(job_id: str, request: Request) -> JSONResponse:
    service, tenant = tenant_of(request)
    return await call(service.get_job, tenant, job_id)


@router.post("/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> JSONResponse:
    service, tenant = tenant_of(request)
    return await call(service.cancel, tenant, job_id)


@router.post("/fine_tuning/jobs/{job_id}/pause")
async def pause_job(job_id: str, request: Request) -> JSONResponse:
    service, tenant = tenant_of(request)
    return await call(service.pause, tenant, job_id)


@router.post("/fine_tuning/jobs/{job_id}/resume")
async def resume_job(job_id: str, request: Request) -> JSONResponse:
    service, tenant = tenant_of(request)
    return await call(service.resume, tenant, job_id)


@router.get("/fine_tuning/jobs/{job_id}/events")
async def list_events(job_id: str, request: Request) -> Response:
    service, tenant = tenant_of(request)
    q = query(request, {"after", "limit", "stream"})
    if q.get("stream", "false").lower() == "true":
        await asyncio.to_thread(service.job_row, tenant, job_id)  # a 404 before the stream starts
        stream = event_stream(service, tenant, job_id)
        return StreamingResponse(stream, media_type="text/event-stream")
    return await call(
        service.list_events, tenant, job_id, q.get("after"), int_param(q, "limit", 20)
    )


async def event_stream(
    service: FineTuning, tenant: str, job_id: str, poll_s: float = 0.5
) -> AsyncIterator[str]:
    """Every event of the job, oldest first, as server-sent events, until the job has ended."""
    seq = 0
    while True:
        events, ended = await asyncio.to_thread(service.events_since, tenant, job_id, seq)
        for e in events:
            seq = e.seq
            yield f"data: {json.dumps(event_object(e))}\n\n"
        if ended and not events:
            yield "data: [DONE]\n\n"
            return
        await asyncio.sleep(poll_s)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, request: Request) -> JSONResponse:
    service, tenant = tenant_of(request)
    q = query(request, {"after", "limit"})
    return await call(
        service.list_checkpoints, tenant, job_id, q.get("after"), int_param(q, "limit", 10)
    )
