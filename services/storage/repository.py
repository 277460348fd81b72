"""Reads and writes of jobs and stage records: the storage adapter of the domain types."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.core.params import JobParams
from services.core.requests import JobRequest
from services.core.steps import Outcome, StageRecord
from services.storage.models import Job, Stage, utcnow

RECORD_FIELDS = (
    "kind",
    "role",
    "model",
    "prompt_tokens",
    "cached_prompt_tokens",
    "generated_tokens",
    "tflops",
    "prefill_tflops",
    "latency_s",
    "note",
    "output",
    "attempt",
)


Row = TypeVar("Row")


def add_unless_taken(session: Session, row: object, taken: Callable[[], Row | None]) -> Row | None:
    """Insert `row` (in a savepoint); None once it is in. If a racing request took its
    idempotency key first, what `taken()` finds instead."""
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        earlier = taken()
        if earlier is None:
            raise
        return earlier
    return None


def new_job(
    owner: str,
    request: JobRequest,
    *,
    idempotency_key: str | None = None,
    batch_id: str | None = None,
    line: int | None = None,
    custom_id: str | None = None,
    status: str = "queued",
) -> Job:
    return Job(
        owner=owner,
        strategy=request.strategy,
        question=request.question,
        params=stored_params(request.params),
        status=status,
        idempotency_key=idempotency_key,
        batch_id=batch_id,
        line=line,
        custom_id=custom_id,
    )


def job_request(job: Job) -> JobRequest:
    return request_of(job.question, job.strategy, job.params)


def request_of(question: str, strategy: str, params: dict[str, Any] | None) -> JobRequest:
    return JobRequest.model_validate(
        {"question": question, "strategy": strategy, "params": params or {}}
    )


def stored_params(params: JobParams) -> dict[str, Any]:
    """Params as a job row keeps them: only what differs from the defaults."""
    return params.model_dump(mode="json", exclude_defaults=True)


def to_record(stage: Stage) -> StageRecord:
    return StageRecord(seq=stage.seq, **{name: getattr(stage, name) for name in RECORD_FIELDS})


def load_records(session: Session, job_id: str) -> dict[int, StageRecord]:
    columns = [getattr(Stage, name) for name in RECORD_FIELDS]
    rows = session.execute(
        select(Stage.seq, *columns).where(Stage.job_id == job_id).order_by(Stage.seq)
    )
    return {row.seq: StageRecord(**row._asdict()) for row in rows}


def add_stage(
    session: Session, job_id: str, record: StageRecord, created_at: datetime | None = None
) -> bool:
    """Insert the record unless (job, seq) already has one, in one round trip. Returns
    whether it inserted. The caller holds the job's row lock; the unique constraint on
    (job_id, seq) is what makes a duplicate a no-op. `created_at`: when the stage
    finished (default: now)."""
    values = {name: getattr(record, name) for name in RECORD_FIELDS}
    dialect = session.get_bind().dialect.name
    insert = (postgresql_insert if dialect == "postgresql" else sqlite_insert)(Stage)
    statement = (
        insert.values(job_id=job_id, seq=record.seq, created_at=created_at or utcnow(), **values)
        .on_conflict_do_nothing(index_elements=["job_id", "seq"])
        .returning(Stage.id)
    )
    return session.execute(statement).first() is not None


def succeeded_values(outcome: Outcome) -> dict[str, Any]:
    now = utcnow()
    return {
        "status": "succeeded",
        "answer": outcome.answer,
        "final_text": outcome.final_text,
        "summary": outcome.summary,
        "finished_at": now,
        "updated_at": now,
    }


def failed_values(error: str) -> dict[str, Any]:
    now = utcnow()
    return {"status": "failed", "error": error, "finished_at": now, "updated_at": now}


def cancelled_values() -> dict[str, Any]:
    now = utcnow()
    return {"status": "cancelled", "finished_at": now, "updated_at": now}


def mark_succeeded(job: Job, outcome: Outcome) -> None:
    _assign(job, succeeded_values(outcome))


def mark_failed(job: Job, error: str) -> None:
    _assign(job, failed_values(error))


def mark_cancelled(job: Job) -> None:
    _assign(job, cancelled_values())


def _assign(job: Job, values: dict[str, Any]) -> None:
    for name, value in values.items():
        setattr(job, name, value)


def stage_json(stage: StageRecord | Stage) -> dict[str, Any]:
    record = stage if isinstance(stage, StageRecord) else to_record(stage)
    return record.to_dict()
