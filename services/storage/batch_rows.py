"""Batch rows in Postgres, and the bulk reads and writes of a batch's jobs: the COPY that
stores an upload, the duplicate check, result pages, the feed cursor, a batch cancel."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, func, insert, literal, select, update
from sqlalchemy.orm import Session

from services.storage.models import Batch, Job
from services.storage.statuses import ACTIVE_JOB_STATUSES, BatchStatus, JobStatus

COPY_CHUNK = 5000  # rows per INSERT where COPY is not available (SQLite)
CHUNK = 1000  # rows per statement for deletes and result pages


def by_idempotency_key(session: Session, owner: str, key: str) -> Batch | None:
    """The owner's batch created with `key`, locked."""
    return session.scalar(
        select(Batch).where(Batch.owner == owner, Batch.idempotency_key == key).with_for_update()
    )


def owned(session: Session, batch_id: str, owner: str, lock: bool = False) -> Batch | None:
    """The owner's batch; None for a missing one, another owner's, or one being deleted."""
    query = select(Batch).where(
        Batch.id == batch_id[:40], Batch.owner == owner, Batch.deleted_at.is_(None)
    )
    return session.scalar(query.with_for_update() if lock else query)


def lock_in(session: Session, batch_id: str, statuses: Sequence[str]) -> Batch | None:
    """The batch, locked, if it is in one of `statuses` and nobody else holds it."""
    return session.scalar(
        select(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(statuses))
        .with_for_update(skip_locked=True)
    )


JOB_COLUMNS = (
    "id",
    "owner",
    "strategy",
    "question",
    "params",
    "batch_id",
    "line",
    "custom_id",
    "created_at",
)


def write_jobs(session: Session, rows: Iterable[tuple]) -> int:
    """Insert queued jobs from `rows` (JOB_COLUMNS order): one COPY on Postgres, chunked
    INSERTs elsewhere. Returns how many."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        return _insert_chunks(session, rows)
    columns = (*JOB_COLUMNS, "status", "summary", "cancel_requested", "attempts", "updated_at")
    statement = f"COPY jobs ({', '.join(columns)}) FROM STDIN"
    driver = connection.connection.driver_connection
    count = 0
    buffer: list[str] = []
    with driver.cursor() as cursor, cursor.copy(statement) as copy:  # type: ignore[union-attr]
        for row in rows:
            buffer.append(_copy_line(row))
            count += 1
            if len(buffer) >= COPY_CHUNK:
                copy.write("".join(buffer))
                buffer.clear()
        if buffer:
            copy.write("".join(buffer))
    return count


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_line(row: tuple) -> str:
    """One row in COPY's text format (tab-separated, backslash escapes); formatting it here
    is several times faster than adapting each value (`write_row`)."""
    job_id, owner, strategy, question, params, batch_id, line, custom_id, created = row
    when = _timestamp(created)
    fields = (
        job_id,
        _escape(owner),
        _escape(strategy),
        _escape(question),
        _escape(params),
        batch_id,
        str(line),
        _escape(custom_id),
        when,
        "queued",
        "{}",
        "f",
        "0",
        when,
    )
    return "\t".join(fields) + "\n"


def _escape(text: str) -> str:
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return text.translate(_COPY_ESCAPES)
    return text


@functools.lru_cache(maxsize=8)
def _timestamp(moment: datetime) -> str:
    return moment.isoformat()


def _insert_chunks(session: Session, rows: Iterable[tuple]) -> int:
    count = 0
    chunk: list[dict[str, Any]] = []
    for row in rows:
        values = dict(zip(JOB_COLUMNS, row, strict=True))
        values["params"] = json.loads(values["params"])
        chunk.append({**values, "status": "queued", "summary": {}, "updated_at": row[-1]})
        if len(chunk) >= COPY_CHUNK:
            count += _insert(session, chunk)
            chunk = []
    return count + (_insert(session, chunk) if chunk else 0)


def _insert(session: Session, chunk: list[dict[str, Any]]) -> int:
    session.execute(insert(Job), chunk)
    return len(chunk)


def duplicate_lines(session: Session, batch_id: str) -> Iterator[Any]:
    """The batch's jobs whose custom_id an earlier line already used: rows of (id, line,
    custom_id, first), `first` being that earlier line."""
    first = func.min(Job.line).over(partition_by=Job.custom_id).label("first")
    ranked = select(Job.id, Job.line, Job.custom_id, first).where(Job.batch_id == batch_id)
    ranked_sq = ranked.subquery()
    query = select(ranked_sq).where(ranked_sq.c.line != ranked_sq.c.first)
    yield from session.execute(query.execution_options(yield_per=CHUNK))


def delete_jobs(session: Session, job_ids: Sequence[str]) -> None:
    for start in range(0, len(job_ids), CHUNK):
        session.execute(delete(Job).where(Job.id.in_(job_ids[start : start + CHUNK])))


def result_page(session: Session, batch_id: str, after_line: int) -> list[Any]:
    """The batch's next jobs after `after_line`, in line order, as result rows."""
    return session.execute(
        select(Job.id, Job.line, Job.custom_id, Job.status, Job.answer, Job.error)
        .where(Job.batch_id == batch_id, Job.line > after_line)
        .order_by(Job.line)
        .limit(CHUNK)
    ).all()


def has_unfinished(session: Session, batch_id: str) -> bool:
    query = (
        select(Job.id)
        .where(Job.batch_id == batch_id, Job.status.in_(ACTIVE_JOB_STATUSES))
        .limit(1)
    )
    return session.scalar(query) is not None


def cancel_jobs(session: Session, batch_id: str) -> None:
    """Queued jobs of the batch end cancelled; running ones are asked to stop at their next
    stage boundary; finished ones are kept. One UPDATE, after locking the rows in id order:
    an UPDATE takes them in scan order, which can cross a worker or the reconciler locking
    the same jobs and end in a deadlock."""
    queued = Job.status == JobStatus.QUEUED
    unfinished = (
        select(Job.id)
        .where(Job.batch_id == batch_id, Job.status.in_(ACTIVE_JOB_STATUSES))
        .order_by(Job.id)
        .with_for_update()
    )
    session.execute(
        update(Job)
        .where(Job.id.in_(unfinished.scalar_subquery()))
        .values(
            cancel_requested=True,
            status=case((queued, JobStatus.CANCELLED.value), else_=Job.status),
            finished_at=case((queued, func.now()), else_=Job.finished_at),
            leases=case((queued, literal({}, Job.leases.type)), else_=Job.leases),
            updated_at=func.now(),
        )
        .execution_options(synchronize_session=False)
    )


def next_unfed(session: Session, batch: Batch, limit: int) -> list[Job]:
    """The batch's next `limit` jobs past its feed cursor, in line order."""
    return list(
        session.scalars(
            select(Job)
            .where(Job.batch_id == batch.id, Job.line > batch.fed_through_line)
            .order_by(Job.line)
            .limit(limit)
        )
    )


def unfed_by_owner(session: Session) -> dict[str, list[str]]:
    """Batches in progress with jobs not fed yet, by owner: each owner's in creation order
    (within one owner, batches keep their order); owners by their oldest such batch."""
    unfed = (
        select(Job.id).where(Job.batch_id == Batch.id, Job.line > Batch.fed_through_line).exists()
    )
    query = (
        select(Batch.owner, Batch.id)
        .where(Batch.status == BatchStatus.IN_PROGRESS, unfed)
        .order_by(Batch.created_at, Batch.id)
    )
    owners: dict[str, list[str]] = {}
    for owner, batch_id in session.execute(query):
        owners.setdefault(owner, []).append(batch_id)
    return owners


def ids_in(session: Session, statuses: Sequence[str]) -> list[str]:
    return list(session.scalars(select(Batch.id).where(Batch.status.in_(statuses))))


def stale_uploads(session: Session, older_than_s: float) -> list[Batch]:
    """Batches still validating long after their upload began, locked."""
    cutoff = func.now() - timedelta(seconds=older_than_s)
    return list(
        session.scalars(
            select(Batch)
            .where(Batch.status == BatchStatus.VALIDATING, Batch.created_at < cutoff)
            .with_for_update(skip_locked=True)
        )
    )


def overdue(session: Session) -> list[Batch]:
    """Batches in progress past their completion window (`expires_at`), locked."""
    return list(
        session.scalars(
            select(Batch)
            .where(Batch.status == BatchStatus.IN_PROGRESS, Batch.expires_at < func.now())
            .with_for_update(skip_locked=True)
        )
    )


def unfinished_lines(session: Session, owner: str, at_most: int) -> int:
    """The owner's batch jobs not finished yet, counting no further than `at_most`."""
    unfinished = (
        select(Job.id)
        .where(
            Job.owner == owner, Job.batch_id.is_not(None), Job.status.in_(ACTIVE_JOB_STATUSES)
        )
        .limit(at_most)
        .subquery()
    )
    return session.scalar(select(func.count()).select_from(unfinished)) or 0
