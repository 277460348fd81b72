"""Stage records in Postgres: the storage form of `StageRecord`, one row per (job, seq)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from services.core.steps import StageRecord
from services.storage.models import Stage, utcnow

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


def to_record(stage: Stage) -> StageRecord:
    return StageRecord(seq=stage.seq, **{name: getattr(stage, name) for name in RECORD_FIELDS})


def load_records(session: Session, job_id: str) -> dict[int, StageRecord]:
    """A job's records by seq. Its own statement: under READ COMMITTED it sees every record
    committed before it starts (a statement that waited for the job's row lock and read the
    stages in the same statement would not see the ones its lock holder committed)."""
    columns = [getattr(Stage, name) for name in RECORD_FIELDS]
    rows = session.execute(
        select(Stage.seq, *columns).where(Stage.job_id == job_id).order_by(Stage.seq)
    )
    return {row.seq: StageRecord(**row._asdict()) for row in rows}


def add_stage(
    session: Session, job_id: str, record: StageRecord, created_at: datetime | None = None
) -> bool:
    """Insert the record unless (job, seq) already has one, in one round trip. Returns
    whether it inserted. The unique constraint on (job_id, seq) is what makes a duplicate a
    no-op. `created_at`: when the stage finished (default: now)."""
    values = {name: getattr(record, name) for name in RECORD_FIELDS}
    dialect = session.get_bind().dialect.name
    stages = Stage.__table__  # Core, not the ORM's bulk path: this is the hot path
    insert = (postgresql_insert if dialect == "postgresql" else sqlite_insert)(stages)
    statement = (
        insert.values(job_id=job_id, seq=record.seq, created_at=created_at or utcnow(), **values)
        .on_conflict_do_nothing(index_elements=["job_id", "seq"])
        .returning(stages.c.id)
    )
    return session.execute(statement).first() is not None
