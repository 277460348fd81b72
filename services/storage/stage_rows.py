"""Stage records in Postgres: the storage form of `StageRecord`, one row per (job, seq)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
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


def records_from_json(rows: list[dict[str, Any]]) -> dict[int, StageRecord]:
    """Records as `tandem_lock_job` returns them (a JSON object per stage row)."""
    fields = ("seq", *RECORD_FIELDS)
    return {row["seq"]: StageRecord(**{name: row[name] for name in fields}) for row in rows}


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


def record_and_advance(
    session: Session,
    job_id: str,
    record: StageRecord,
    created_at: datetime,
    leases: dict[str, Any],
) -> bool:
    """Insert the record and write the job's new leases in one statement (a stage that does
    not end its job: the hot path of a queue hop). Its transaction commits without waiting
    for the disk: a Postgres crash may lose the last such records, and their stages then run
    again (their leases were lost with them); a job's outcome always commits durably. Returns
    False if (job, seq) already had a record (nothing is written then)."""
    values = {name: getattr(record, name) for name in RECORD_FIELDS}
    values["output"] = json.dumps(values["output"])
    params = {**values, "job_id": job_id, "seq": record.seq, "created_at": created_at}
    params["leases"] = json.dumps(leases)
    return session.execute(_RECORD_AND_ADVANCE, params).first() is not None


_RECORD_AND_ADVANCE = text(
    """
    WITH recorded AS (
        INSERT INTO stages (job_id, seq, kind, role, model, prompt_tokens,
            cached_prompt_tokens, generated_tokens, tflops, prefill_tflops, latency_s, note,
            output, attempt, created_at)
        VALUES (:job_id, :seq, :kind, :role, :model, :prompt_tokens, :cached_prompt_tokens,
            :generated_tokens, :tflops, :prefill_tflops, :latency_s, :note,
            CAST(:output AS jsonb), :attempt, :created_at)
        ON CONFLICT (job_id, seq) DO NOTHING
        RETURNING id
    ), asynchronous AS (
        -- SET LOCAL synchronous_commit = off, in this round trip (see the docstring)
        SELECT set_config('synchronous_commit', 'off', true) AS done
    )
    UPDATE jobs SET leases = CAST(:leases AS jsonb), updated_at = now()
    WHERE id = :job_id AND EXISTS (SELECT 1 FROM recorded)
      AND (SELECT done FROM asynchronous) IS NOT NULL
    RETURNING id
    """
)
