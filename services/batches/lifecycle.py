"""A batch's life after its upload: cancel, finalize once every job is final, and fail
uploads that died half-way.

    validating -> in_progress -> finalizing -> completed
    validating -> failed                      (no valid line, too many lines / invalid lines)
    in_progress -> cancelling -> cancelled    (running jobs stop at their next stage boundary)
    in_progress -> finalizing -> expired      (past an OpenAI batch's completion window:
                                               unfinished jobs are cancelled, what finished
                                               is kept)

A batch created through the OpenAI API gets its output and error files (OpenAI's batch
output format, services/files/batch_output.py) in the transaction that ends it.

Each final status writes the batch's webhook event in the transaction that sets it
(`emit_batch`: nothing when no endpoint of the owner subscribes).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from services.batches.progress import progress
from services.storage import batch_rows
from services.storage.db import transaction
from services.storage.models import Batch, utcnow
from services.storage.statuses import ACTIVE_BATCH_STATUSES, BatchStatus
from services.webhooks.events import EventType, emit_batch

STALE_UPLOAD_S = 3600.0  # a batch still validating after this lost its upload


def cancel(session: Session, batch: Batch) -> bool:
    """Cancel a batch (the caller holds its row lock): queued jobs end now, running ones
    stop at their next stage boundary, finished ones are kept. Returns whether anything
    changed (a finished or already cancelling batch is left as it is)."""
    if batch.status != BatchStatus.IN_PROGRESS:
        return False
    batch_rows.cancel_jobs(session, batch.id)
    batch.status = BatchStatus.CANCELLING
    batch.cancelled_at = utcnow()
    return True


def finalize_if_done(url: str, batch_id: str) -> bool:
    """When every job of the batch is final: in_progress -> finalizing -> completed (or
    cancelling -> cancelled), freezing its counts and cost. Returns whether it finalized."""
    with transaction(url) as session:
        batch = batch_rows.lock_in(session, batch_id, ACTIVE_BATCH_STATUSES)
        if batch is None or batch_rows.has_unfinished(session, batch_id):
            return False
        if batch.status == BatchStatus.IN_PROGRESS:
            batch.status = BatchStatus.FINALIZING
    with transaction(url) as session:
        closing = (BatchStatus.CANCELLING, BatchStatus.FINALIZING)
        batch = batch_rows.lock_in(session, batch_id, closing)
        if batch is None:
            return False
        done = progress(session, batch)
        batch.metadata_ = {**(batch.metadata_ or {}), "final": done.to_dict()}
        if batch.expired_at is not None:
            batch.status = BatchStatus.EXPIRED
        elif batch.status == BatchStatus.CANCELLING:
            batch.status = BatchStatus.CANCELLED
        else:
            batch.status = BatchStatus.COMPLETED
        batch.finished_at = utcnow()
        if batch.api == "openai":
            from services.files.batch_output import write_batch_files

            write_batch_files(session, batch)
        emit_batch(session, batch, _EVENTS[BatchStatus(batch.status)])
        return True


_EVENTS = {
    BatchStatus.COMPLETED: EventType.BATCH_COMPLETED,
    BatchStatus.CANCELLED: EventType.BATCH_CANCELLED,
    BatchStatus.EXPIRED: EventType.BATCH_EXPIRED,
}


def finalize_finished(url: str) -> None:
    """Finalize every active batch whose jobs are all final."""
    with transaction(url) as session:
        active = batch_rows.ids_in(session, ACTIVE_BATCH_STATUSES)
    for batch_id in active:
        finalize_if_done(url, batch_id)


def expire_overdue(url: str) -> int:
    """Batches in progress past their completion window expire: queued jobs are cancelled,
    running ones stop at their next stage boundary, finished ones are kept. The batch is
    `finalizing` until no job runs, then `expired` (see `finalize_if_done`). Returns how
    many began expiring."""
    with transaction(url) as session:
        overdue = batch_rows.overdue(session)
        for batch in overdue:
            batch_rows.cancel_jobs(session, batch.id)
            batch.status = BatchStatus.FINALIZING
            batch.expired_at = utcnow()
        return len(overdue)


def fail_stale_uploads(url: str, older_than_s: float = STALE_UPLOAD_S) -> int:
    """A batch still validating long after its upload began lost its request (a crashed API
    process): mark it failed."""
    with transaction(url) as session:
        stale = batch_rows.stale_uploads(session, older_than_s)
        for batch in stale:
            batch.status = BatchStatus.FAILED
            failure = {"failure": "the upload was interrupted", "upload_broke": True}
            batch.metadata_ = {**(batch.metadata_ or {}), **failure}
            batch.finished_at = utcnow()
            emit_batch(session, batch, EventType.BATCH_FAILED)
        return len(stale)
