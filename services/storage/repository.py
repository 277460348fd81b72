"""Reads and writes of jobs and stage records: the storage adapter of the domain types."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.core.params import JobRequest
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
        params=request.params.model_dump(mode="json", exclude_defaults=True),
        status=status,
        idempotency_key=idempotency_key,
        batch_id=batch_id,
        line=line,
        custom_id=custom_id,
    )


def job_request(job: Job) -> JobRequest:
    return JobRequest.model_validate(
        {"question": job.question, "strategy": job.strategy, "params": job.params or {}}
    )


def to_record(stage: Stage) -> StageRecord:
    return StageRecord(seq=stage.seq, **{name: getattr(stage, name) for name in RECORD_FIELDS})


def load_records(session: Session, job_id: str) -> dict[int, StageRecord]:
    rows = session.scalars(select(Stage).where(Stage.job_id == job_id).order_by(Stage.seq))
    return {row.seq: to_record(row) for row in rows}


def has_stage(session: Session, job_id: str, seq: int) -> bool:
    found = session.scalar(select(Stage.id).where(Stage.job_id == job_id, Stage.seq == seq))
    return found is not None


def add_stage(session: Session, job_id: str, record: StageRecord) -> bool:
    """Insert the record unless (job, seq) already has one. Returns whether it inserted.

    The caller holds the job's row lock, so the check and the insert cannot race; the
    unique constraint on (job_id, seq) backs it up."""
    if has_stage(session, job_id, record.seq):
        return False
    values = {name: getattr(record, name) for name in RECORD_FIELDS}
    session.add(Stage(job_id=job_id, seq=record.seq, **values))
    session.flush()
    return True


def mark_succeeded(job: Job, outcome: Outcome) -> None:
    job.status = "succeeded"
    job.answer = outcome.answer
    job.final_text = outcome.final_text
    job.summary = outcome.summary
    job.finished_at = job.updated_at = utcnow()


def mark_failed(job: Job, error: str) -> None:
    job.status = "failed"
    job.error = error
    job.finished_at = job.updated_at = utcnow()


def stage_json(stage: StageRecord | Stage) -> dict[str, Any]:
    record = stage if isinstance(stage, StageRecord) else to_record(stage)
    return record.to_dict()
