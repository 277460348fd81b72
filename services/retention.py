"""Retention and deletion: what Postgres keeps, and for how long.

With TANDEM_RETENTION_DAYS set, the reconciler purges (and `tandem purge --older-than DAYS`
does by hand):
- finished single jobs whose `finished_at` is older than that, with their stages;
- finished batches older than that, with their jobs and stages;
- webhook deliveries that ended before that, and events no delivery refers to any more;
- whatever steps other modules register with `register` (stored files, for instance).

Owners' deletions (`DELETE /v1/jobs/{id}`, `DELETE /v1/batches/{id}`) use the same pieces;
a batch too large to delete within its request is marked deleted (invisible at once) and the
reconciler finishes it, retention set or not.

Never a long lock: every chunk is its own short transaction of at most `CHUNK` rows, taken
with SKIP LOCKED (rows someone holds are left for the next pass), found by an index (single
jobs: `ix_jobs_finished_single`; a batch's jobs: `ix_jobs_batch_line`). Unfinished jobs are
never selected. Before a job is deleted its cost goes into the usage rollups, in the same
transaction (services/storage/usage_rows.py), so totals and billing outlive the rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session

from services.settings import Settings
from services.storage import usage_rows, webhook_rows
from services.storage.db import transaction
from services.storage.models import Batch, Job, utcnow
from services.storage.statuses import FINAL_BATCH_STATUSES, FINAL_JOB_STATUSES

log = logging.getLogger("tandem.retention")

CHUNK = 500  # rows per transaction
PAUSE_S = 0.01  # between chunks: live transactions go first
PURGE_EVERY_S = 300.0  # the reconciler's purge thread
BATCHES_PER_PASS = 100

# step(url, cutoff, limit) -> rows deleted in one short transaction (0: nothing left).
PurgeStep = Callable[[str, datetime, int], int]
_steps: dict[str, PurgeStep] = {}


def register(name: str, step: PurgeStep) -> None:
    """Another kind of row to purge with the rest (called at import by its module)."""
    _steps[name] = step


@dataclass
class PurgeReport:
    jobs: int = 0
    batches: int = 0
    deliveries: int = 0
    events: int = 0
    other: dict[str, int] = field(default_factory=dict)
    done: bool = True

    def __str__(self) -> str:
        extra = "".join(f", {n} {name}" for name, n in self.other.items())
        return (
            f"deleted {self.jobs} job(s) (with their stages), {self.batches} batch(es), "
            f"{self.deliveries} webhook deliveries, {self.events} webhook events{extra}"
        )


def purge(
    url: str,
    older_than: timedelta | None,
    chunk: int = CHUNK,
    budget_s: float | None = None,
    pause_s: float = PAUSE_S,
) -> PurgeReport:
    """Purge what finished more than `older_than` ago (None: only batches their owners
    deleted). Stops early, `done` False, once `budget_s` is spent."""
    report = PurgeReport()
    deadline = None if budget_s is None else time.monotonic() + budget_s

    def spent() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    def drain(step: Callable[[], int]) -> int:
        total = 0
        while not spent():
            n = step()
            total += n
            if n < chunk:
                break
            time.sleep(pause_s)
        return total

    cutoff = utcnow() - older_than if older_than is not None else None
    for batch_id in _doomed_batches(url, cutoff):
        report.jobs += drain(lambda b=batch_id: _batch_jobs_chunk(url, b, chunk))
        if spent():
            break
        report.batches += _drop_batch(url, batch_id)
    if cutoff is not None:
        report.jobs += drain(lambda: _single_jobs_chunk(url, cutoff, chunk))
        report.deliveries += drain(lambda: _in_transaction(url, webhook_rows.delete_finished_deliveries, cutoff, chunk))
        report.events += drain(lambda: _in_transaction(url, webhook_rows.delete_spent_events, cutoff, chunk))
        for name, step in _steps.items():
            report.other[name] = drain(lambda s=step: s(url, cutoff, chunk))
    report.done = not spent()
    return report


def _in_transaction(url: str, work: Callable[..., int], *args) -> int:
    with transaction(url) as session:
        return work(session, *args)


# --- jobs -------------------------------------------------------------------------------


def _single_jobs_chunk(url: str, cutoff: datetime, limit: int) -> int:
    with transaction(url) as session:
        ids = list(
            session.scalars(
                select(Job.id)
                .where(
                    Job.batch_id.is_(None),
                    Job.finished_at.is_not(None),
                    Job.finished_at < cutoff,
                    Job.status.in_(FINAL_JOB_STATUSES),
                )
                .order_by(Job.finished_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        return _delete_jobs(session, ids)


def _delete_jobs(session: Session, ids: list[str]) -> int:
    """Roll the jobs' cost up, then delete them (their stages go by the foreign key's
    ON DELETE CASCADE). The caller holds their row locks."""
    if ids:
        usage_rows.roll_up(session, ids)
        session.execute(delete(Job).where(Job.id.in_(ids)).execution_options(synchronize_session=False))
    return len(ids)


def delete_job(session: Session, job_id: str, owner: str) -> str:
    """An owner's deletion of one job: "deleted", or why not: "missing" (or another
    owner's), "unfinished", "in_batch" (a batch's lines go with their batch)."""
    if len(job_id) > 40 or "\x00" in job_id:
        return "missing"
    job = session.execute(
        select(Job.id, Job.status, Job.batch_id)
        .where(Job.id == job_id, Job.owner == owner)
        .with_for_update()
    ).first()
    if job is None:
        return "missing"
    if job.status not in FINAL_JOB_STATUSES:
        return "unfinished"
    if job.batch_id is not None:
        return "in_batch"
    _delete_jobs(session, [job.id])
    return "deleted"


# --- batches ----------------------------------------------------------------------------


def _doomed_batches(url: str, cutoff: datetime | None) -> list[str]:
    where = Batch.deleted_at.is_not(None)
    if cutoff is not None:
        expired = and_(Batch.status.in_(FINAL_BATCH_STATUSES), Batch.finished_at < cutoff)
        where = or_(where, expired)
    with transaction(url) as session:
        query = select(Batch.id).where(where).order_by(Batch.id).limit(BATCHES_PER_PASS)
        return list(session.scalars(query))


def _batch_jobs_chunk(url: str, batch_id: str, limit: int) -> int:
    with transaction(url) as session:
        ids = list(
            session.scalars(
                select(Job.id)
                .where(Job.batch_id == batch_id, Job.status.in_(FINAL_JOB_STATUSES))
                .order_by(Job.line)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        return _delete_jobs(session, ids)


def _drop_batch(url: str, batch_id: str) -> int:
    """Delete the batch row once none of its jobs is left."""
    with transaction(url) as session:
        left = select(Job.id).where(Job.batch_id == batch_id).exists()
        statement = delete(Batch).where(Batch.id == batch_id, ~left)
        return session.execute(statement).rowcount


def mark_batch_deleted(session: Session, batch: Batch) -> None:
    """The owner deleted it (the caller checked it is finished and holds its row lock):
    invisible from now on; its Idempotency-Key is free again."""
    batch.deleted_at = utcnow()
    batch.idempotency_key = None


def delete_batch_rows(url: str, batch_id: str, budget_s: float, chunk: int = CHUNK) -> bool:
    """Delete a batch marked deleted, within `budget_s`; True once it is gone (else the
    reconciler's next purge finishes it)."""
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        if _batch_jobs_chunk(url, batch_id, chunk) < chunk:
            return _drop_batch(url, batch_id) > 0
    return False


# --- the reconciler's purge thread ------------------------------------------------------


def start_purging(settings: Settings, every_s: float = PURGE_EVERY_S) -> threading.Thread:
    """Purge every `every_s` in a thread of the calling process (the reconciler): expired
    rows when TANDEM_RETENTION_DAYS is set, deleted batches always."""
    days = settings.retention_days
    older_than = timedelta(days=days) if days else None

    def run() -> None:
        while True:
            try:
                report = purge(settings.database_url, older_than)
                if report.jobs or report.batches or report.deliveries or report.events:
                    log.info("purge: %s", report)
            except Exception as error:  # a database outage: try again at the next pass
                log.warning("purge failed: %s", str(error).splitlines()[0])
            time.sleep(every_s)

    thread = threading.Thread(target=run, name="purge", daemon=True)
    thread.start()
    return thread
