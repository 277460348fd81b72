"""File rows in Postgres: a `files` row per file and its bytes as `file_chunks` rows, in
order by seq. Every read and write here touches at most a few chunks (see services.files)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select
from sqlalchemy.orm import Session

from services.storage.models import FileChunk, Job, Stage, StoredFile

ID_MAX = 40
CHUNKS = FileChunk.__table__


def owned(session: Session, file_id: str, owner: str) -> StoredFile | None:
    """The owner's file (None for a missing one or another owner's: they look the same)."""
    if len(file_id) > ID_MAX or "\x00" in file_id:
        return None
    return session.scalar(
        select(StoredFile).where(StoredFile.id == file_id, StoredFile.owner == owner)
    )


def add_chunk(session: Session, file_id: str, seq: int, data: bytes) -> None:
    session.execute(insert(CHUNKS).values(file_id=file_id, seq=seq, data=data))


def chunk_page(session: Session, file_id: str, after_seq: int, count: int) -> list[Any]:
    """The file's next `count` chunks after `after_seq`, as (seq, data) rows."""
    return session.execute(
        select(CHUNKS.c.seq, CHUNKS.c.data)
        .where(CHUNKS.c.file_id == file_id, CHUNKS.c.seq > after_seq)
        .order_by(CHUNKS.c.seq)
        .limit(count)
    ).all()


def remove(session: Session, file_id: str) -> None:
    """Delete a file; its chunks go with it (ON DELETE CASCADE)."""
    session.execute(delete(StoredFile).where(StoredFile.id == file_id))


def page(
    session: Session,
    owner: str,
    limit: int,
    *,
    purpose: str | None = None,
    after: tuple[datetime, str] | None = None,
    ascending: bool = False,
) -> list[StoredFile]:
    """Up to `limit` of the owner's files in creation order (newest first unless
    `ascending`), starting after the (created_at, id) of `after`."""
    query = select(StoredFile).where(StoredFile.owner == owner)
    if purpose:
        query = query.where(StoredFile.purpose == purpose)
    if after is not None:
        created, last_id = after
        if ascending:
            query = query.where(
                or_(
                    StoredFile.created_at > created,
                    and_(StoredFile.created_at == created, StoredFile.id > last_id),
                )
            )
        else:
            query = query.where(
                or_(
                    StoredFile.created_at < created,
                    and_(StoredFile.created_at == created, StoredFile.id < last_id),
                )
            )
    order = (StoredFile.created_at, StoredFile.id)
    query = query.order_by(*(o if ascending else o.desc() for o in order)).limit(limit)
    return list(session.scalars(query))


def by_ids(session: Session, file_ids: Sequence[str]) -> list[StoredFile]:
    return list(session.scalars(select(StoredFile).where(StoredFile.id.in_(file_ids))))


# --- reads that make an OpenAI batch's output files ------------------------------------------


def output_page(session: Session, batch_id: str, after_line: int, count: int) -> list[Any]:
    """The batch's next `count` jobs after `after_line`, in line order, with what an output
    line is made of."""
    return session.execute(
        select(
            Job.id,
            Job.line,
            Job.custom_id,
            Job.status,
            Job.strategy,
            Job.params,
            Job.answer,
            Job.final_text,
            Job.error,
            Job.created_at,
        )
        .where(Job.batch_id == batch_id, Job.line > after_line)
        .order_by(Job.line)
        .limit(count)
    ).all()


def last_finish_reasons(session: Session, job_ids: Sequence[str]) -> dict[str, str | None]:
    """Each job's last stage's finish reason ("stop", "length")."""
    if not job_ids:
        return {}
    last = (
        select(Stage.job_id, func.max(Stage.seq).label("seq"))
        .where(Stage.job_id.in_(job_ids))
        .group_by(Stage.job_id)
        .subquery()
    )
    rows = session.execute(
        select(Stage.job_id, Stage.output).join(
            last, and_(Stage.job_id == last.c.job_id, Stage.seq == last.c.seq)
        )
    )
    return {job_id: (output or {}).get("finish_reason") for job_id, output in rows}
