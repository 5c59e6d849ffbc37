"""Rows as OpenAI's objects (the openai client's types parse each of them)."""

from __future__ import annotations

from typing import Any

from serve.finetuning import db


def file_object(row: db.FileRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": row.created_at,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def job_object(row: db.JobRow) -> dict[str, Any]:
    hp = row.method[row.method["type"]]["hyperparameters"]
    return {
        "id": row.id,
        "object": "fine_tuning.job",
        "created_at": row.created_at,
        "finished_at": row.finished_at,
        "estimated_finish": row.estimated_finish,
        "model": row.model,
        "fine_tuned_model": row.fine_tuned_model,
        "organization_id": row.tenant,
        "status": row.status,
        "training_file": row.training_file,
        "validation_file": row.validation_file,
        "result_files": row.result_files or [],
        "trained_tokens": row.trained_tokens,
        "seed": row.seed,
        "suffix": row.suffix,
        "error": row.error,
        "hyperparameters": {k: v for k, v in hp.items() if k != "beta"},
        "method": row.method,
        "metadata": row.user_metadata,
        "integrations": [],
    }


def event_object(row: db.EventRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "fine_tuning.job.event",
        "created_at": row.created_at,
        "level": row.level,
        "message": row.message,
        "type": row.type,
        "data": row.data,
    }


def checkpoint_object(row: db.CheckpointRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": row.created_at,
        "fine_tuned_model_checkpoint": row.model_id,
        "fine_tuning_job_id": row.job_id,
        "step_number": row.step,
        "metrics": {k: v for k, v in row.metrics.items() if v is not None},
    }


def page(items: list[dict], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "has_more": has_more}
