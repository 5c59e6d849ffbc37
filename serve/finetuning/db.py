"""Durable state of the fine-tuning API: files, jobs, events and checkpoints, in any database
SQLAlchemy reaches (SQLite by default). The API process and every job's Ray job write here.

Events are written at most once: each has a per-job `key` saying what it records (a status
change, a step) and a per-job sequence number, both unique per job; a writer that repeats an
event (a runner started again, the API and a runner both seeing a job end) inserts nothing.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running", "paused")


def ordinal() -> int:
    return time.time_ns()


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    pass


class FileRow(Base):
    __tablename__ = "ft_files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(Text)  # where storage holds the bytes
    created_at: Mapped[int] = mapped_column(BigInteger)
    ordinal: Mapped[int] = mapped_column(BigInteger, index=True)  # list order: ns at creation


class JobRow(Base):
    __tablename__ = "ft_jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(128))  # the base model's API name
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    user_metadata: Mapped[dict | None] = mapped_column("metadata", JSON)
    method: Mapped[dict] = mapped_column(JSON)  # OpenAI's method object, "auto" resolved
    job_config: Mapped[dict] = mapped_column(JSON)  # the JobConfig the runner trains with
    runner: Mapped[dict] = mapped_column(JSON)  # what the runner needs besides the JobConfig
    status: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256), unique=True)
    result_files: Mapped[list] = mapped_column(JSON, default=list)
    error: Mapped[dict | None] = mapped_column(JSON)
    ray_job_id: Mapped[str | None] = mapped_column(String(128))
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # Ray jobs started (resume: +1)
    # cancel or pause asked for: its Ray job is stopped (again after an API restart) until Ray
    # says it ended
    stop_pending: Mapped[bool] = mapped_column(default=False)
    ordinal: Mapped[int] = mapped_column(BigInteger, index=True)


class EventRow(Base):
    __tablename__ = "ft_events"
    __table_args__ = (
        UniqueConstraint("job_id", "seq", name="uq_event_seq"),
        UniqueConstraint("job_id", "key", name="uq_event_key"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("ft_jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))  # message or metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON)


class CheckpointRow(Base):
    __tablename__ = "ft_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoint_step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("ft_jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON)
    model_id: Mapped[str] = mapped_column(String(256))  # ft:...:ckpt-step-N, servable
    created_at: Mapped[int] = mapped_column(BigInteger)


Index("ix_events_job_seq", EventRow.job_id, EventRow.seq)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL: readers do not block the writer; busy_timeout: writers from other processes (the
    # Ray jobs) wait their turn instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def connect(url: str) -> sessionmaker[Session]:
    """Sessions on `url`; the tables are created when missing (create_all is idempotent)."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine: Engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    Base.metadata.create_all(engine)
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as session, session.begin():
        yield session


def add_event(
    sessions: sessionmaker[Session],
    job_id: str,
    key: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
    created_at: int | None = None,
) -> bool:
    """Insert the event once: False when the job already has an event with this key. The
    sequence number is the job's next; a concurrent writer that took it first makes us retry."""
    for _ in range(20):
        try:
            with transaction(sessions) as s:
                if s.scalar(
                    select(EventRow.id).where(EventRow.job_id == job_id, EventRow.key == key)
                ):
                    return False
                seq = (
                    s.scalar(select(func.max(EventRow.seq)).where(EventRow.job_id == job_id)) or 0
                ) + 1
                s.add(
                    EventRow(
                        id=new_id("ftevent"),
                        job_id=job_id,
                        seq=seq,
                        key=key,
                        created_at=created_at or now(),
                        level=level,
                        type=type,
                        message=message,
                        data=json.loads(json.dumps(data, default=str)) if data else None,
                    )
                )
            return True
        except IntegrityError:
            continue  # another writer inserted this key or took this seq: look again
    raise RuntimeError(f"could not write event {key} of {job_id}")


def first_event(job_id: str, key: str, message: str) -> EventRow:
    """A new job's first event, added in the transaction that creates the job."""
    return EventRow(
        id=new_id("ftevent"),
        job_id=job_id,
        seq=1,
        key=key,
        created_at=now(),
        level="info",
        type="message",
        message=message,
    )


def set_status(
    sessions: sessionmaker[Session],
    job_id: str,
    status: str,
    *,
    only_from: tuple[str, ...],
    **fields,
) -> bool:
    """Move the job to `status` if it is in one of `only_from` now (one conditional UPDATE: a
    cancelled job is never made running or succeeded by a runner that did not see the cancel)."""
    values = {"status": status, **fields}
    if status in TERMINAL:
        values.setdefault("finished_at", now())
    with transaction(sessions) as s:
        result = s.execute(
            update(JobRow).where(JobRow.id == job_id, JobRow.status.in_(only_from)).values(**values)
        )
        return result.rowcount == 1


def update_job(sessions: sessionmaker[Session], job_id: str, **fields) -> None:
    with transaction(sessions) as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(**fields))


def get_job(sessions: sessionmaker[Session], job_id: str) -> JobRow | None:
    with sessions() as s:
        return s.get(JobRow, job_id)
