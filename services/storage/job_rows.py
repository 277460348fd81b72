"""Job rows in Postgres: creating them, reading them, and every change of a job's status.

A job's status changes only through the `mark_*` functions below, whichever path gets
there (a stage's worker, the reconciler, a cancel, the embedded recorder). Each is one
UPDATE that touches an unfinished job only, so a final status is never overwritten and
two paths racing to end a job leave exactly one ending.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Update, func, select, text, update
from sqlalchemy.orm import Session, selectinload

from services.core.params import JobParams
from services.core.requests import JobRequest
from services.core.steps import Outcome
from services.storage import webhook_rows
from services.storage.models import Batch, Job
from services.storage.statuses import ACTIVE_JOB_STATUSES, JobStatus
from services.webhooks.event_types import JOB_EVENTS

JOBS = Job.__table__
ID_MAX = 40  # no job id is longer (`job_` + 32 hex digits)


def new_job(
    owner: str,
    request: JobRequest,
    *,
    idempotency_key: str | None = None,
    batch_id: str | None = None,
    line: int | None = None,
    custom_id: str | None = None,
    status: JobStatus = JobStatus.QUEUED,
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


def lock(session: Session, job_id: str) -> Any | None:
    """Lock a job's row (FOR UPDATE) and read what a stage transaction decides from, with
    the database's clock (`now`, epoch seconds): one round trip. None for a missing job."""
    columns = [JOBS.c[name] for name in _LOCKED_COLUMNS]
    created = func.extract("epoch", JOBS.c.created_at).label("created")
    now = func.extract("epoch", func.clock_timestamp()).label("now")
    query = select(*columns, created, now).where(JOBS.c.id == job_id).with_for_update()
    return session.execute(query).first()


def lock_with_records(session: Session, job_id: str) -> Any | None:
    """`lock` plus the job's stage records (a JSON list, by seq), in one round trip: the
    records are read by a second statement inside `tandem_lock_job` (migration 0007), so
    they include everything committed before the lock was granted."""
    return session.execute(_LOCK_WITH_RECORDS, {"id": job_id}).first()


_LOCK_WITH_RECORDS = text("SELECT * FROM tandem_lock_job(:id)")


_LOCKED_COLUMNS = (
    "id",
    "status",
    "cancel_requested",
    "leases",
    "error",
    "batch_id",
    "question",
    "strategy",
    "params",
)


def take_lease(
    session: Session,
    job_id: str,
    seq: int,
    token: str,
    holder: str,
    retry_of: str | None,
    deadline_s: float,
    max_attempts: int,
) -> Any | None:
    """Start step `seq` under the lease `token` in one statement, if nothing stands in the
    way: the job runs and is not cancelled, the lease is this token's, nobody live holds it
    (or its holder is the one `retry_of` names), and it has attempts left. Returns the job's
    params and strategy and the lease's attempt count, or None (the caller then looks closer,
    under the row lock). The UPDATE waits for a transaction holding the row and re-checks
    these conditions on what it committed."""
    return session.execute(
        _TAKE_LEASE,
        {
            "id": job_id,
            "seq": str(seq),
            "token": token,
            "holder": holder,
            "retry_of": retry_of,
            "deadline": deadline_s,
            "max_attempts": max_attempts,
        },
    ).first()


_TAKE_LEASE = text(
    """
    WITH asynchronous AS (
        -- SET LOCAL synchronous_commit = off, in this round trip: a start a crash loses is
        -- taken again (see services.storage.db.soft_transaction)
        SELECT set_config('synchronous_commit', 'off', true) AS done
    )
    UPDATE jobs
    SET leases = jsonb_set(
            leases,
            ARRAY[CAST(:seq AS text)],
            (leases -> CAST(:seq AS text)) || jsonb_build_object(
                'holder', CAST(:holder AS text),
                'until', extract(epoch FROM clock_timestamp()) + CAST(:deadline AS numeric),
                'attempts', coalesce((leases -> CAST(:seq AS text) ->> 'attempts')::int, 0) + 1
            )
        ),
        attempts = attempts + 1,
        status = 'running',
        started_at = coalesce(started_at, now()),
        updated_at = now()
    WHERE id = :id
      AND status IN ('queued', 'running')
      AND NOT cancel_requested
      AND leases -> CAST(:seq AS text) ->> 'token' = :token
      AND coalesce((leases -> CAST(:seq AS text) ->> 'attempts')::int, 0) < :max_attempts
      AND (
          leases -> CAST(:seq AS text) ->> 'holder' IS NULL
          OR (leases -> CAST(:seq AS text) ->> 'until')::float8
             <= extract(epoch FROM clock_timestamp())
          OR leases -> CAST(:seq AS text) ->> 'holder' = CAST(:retry_of AS text)
      )
      AND (SELECT done FROM asynchronous) IS NOT NULL
    RETURNING params, strategy, (leases -> CAST(:seq AS text) ->> 'attempts')::int AS attempt,
        extract(epoch FROM clock_timestamp())
            - (leases -> CAST(:seq AS text) ->> 'granted_at')::float8 AS queued_s
    """
)


def db_now(session: Session) -> float:
    """The database's clock, epoch seconds: the one clock for leases and deadlines."""
    return float(session.scalar(select(func.extract("epoch", func.clock_timestamp()))))


def by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))


def owned(session: Session, job_id: str, owner: str, with_stages: bool = True) -> Job | None:
    """The owner's job (None for a missing one or another owner's: they look the same)."""
    if len(job_id) > ID_MAX or "\x00" in job_id:
        return None
    query = select(Job).where(Job.id == job_id, Job.owner == owner)
    if with_stages:
        query = query.options(selectinload(Job.stages))
    return session.scalar(query)


def count_active(session: Session, owner: str, at_most: int) -> int:
    """The owner's unfinished jobs, counting no further than `at_most` (a bounded scan)."""
    unfinished = (
        select(Job.id)
        .where(Job.owner == owner, Job.status.in_(ACTIVE_JOB_STATUSES))
        .limit(at_most)
        .subquery()
    )
    return session.scalar(select(func.count()).select_from(unfinished)) or 0


def status_counts(session: Session, *where: Any) -> dict[str, int]:
    """Jobs by status (every status present, zeros included) among those matching `where`."""
    rows = session.execute(select(Job.status, func.count()).where(*where).group_by(Job.status))
    counts = dict.fromkeys(JobStatus, 0)
    counts.update({JobStatus(status): int(n) for status, n in rows})
    return {str(status): n for status, n in counts.items()}


def stale_ids(session: Session, deadline_s: float, limit: int) -> list[str]:
    """Unfinished jobs with no progress (nor heartbeat) for `deadline_s` by the database's
    clock, longest first. A batch's jobs past its feed cursor are not stale: they wait for
    the batch feeder."""
    cutoff = func.now() - timedelta(seconds=deadline_s)
    unfed = select(Batch.id).where(Batch.id == Job.batch_id, Job.line > Batch.fed_through_line)
    query = (
        select(Job.id)
        .where(Job.status.in_(ACTIVE_JOB_STATUSES), Job.updated_at < cutoff, ~unfed.exists())
        .order_by(Job.updated_at)
        .limit(limit)
    )
    return list(session.scalars(query))


# --- status changes ---------------------------------------------------------------------


def set_values(session: Session, job_id: str, **values: Any) -> None:
    """Write columns of a job row (the caller holds its row lock and decided the change)."""
    session.execute(update(JOBS).where(JOBS.c.id == job_id).values(**values))


def mark_running(session: Session, job_id: str, **values: Any) -> bool:
    """A queued job's first stage started (or a later one started again)."""
    return _change(
        session,
        job_id,
        status=JobStatus.RUNNING,
        started_at=func.coalesce(JOBS.c.started_at, func.now()),
        **values,
    )


def mark_succeeded(session: Session, job_id: str, outcome: Outcome, **values: Any) -> bool:
    return _finish(
        session,
        job_id,
        JobStatus.SUCCEEDED,
        answer=outcome.answer,
        final_text=outcome.final_text,
        summary=outcome.summary,
        **values,
    )


def mark_failed(session: Session, job_id: str, error: str, **values: Any) -> bool:
    return _finish(session, job_id, JobStatus.FAILED, error=error, **values)


def mark_cancelled(session: Session, job_id: str, **values: Any) -> bool:
    return _finish(session, job_id, JobStatus.CANCELLED, cancel_requested=True, **values)


def _finish(session: Session, job_id: str, status: JobStatus, **values: Any) -> bool:
    """A final status; a finished job holds no leases. The job's webhook event (if its
    owner subscribes) is written in the same transaction, only when the job changed."""
    values["leases"] = {}
    statement = _guarded(job_id, status=status, finished_at=func.now(), **values)
    return webhook_rows.finish_job(session, statement, JOB_EVENTS[status])


def _change(session: Session, job_id: str, **values: Any) -> bool:
    """Update an unfinished job; False if it was already final (or is missing)."""
    return session.execute(_guarded(job_id, **values)).rowcount > 0


def _guarded(job_id: str, **values: Any) -> Update:
    return (
        update(JOBS)
        .where(JOBS.c.id == job_id, JOBS.c.status.in_(ACTIVE_JOB_STATUSES))
        .values(updated_at=func.now(), **values)
    )
