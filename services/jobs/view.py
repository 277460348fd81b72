"""A job as a stage transaction sees it: locked, with its records, on the database's clock.

Every decision about a job's next stages is made from a `JobView` taken under the job's row
lock (`lock`), so two workers, the reconciler and a cancel see one job one at a time. The
records are read by their own statement after the lock is held: under READ COMMITTED a
statement sees what was committed before it started, so the records include everything the
previous lock holder wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from sqlalchemy.orm import Session

from services.core.requests import JobRequest
from services.core.steps import StageRecord, Step
from services.core.strategies import program_for
from services.core.workflow import Finished, Pending, advance
from services.jobs.leases import Leases, leases_from_json
from services.storage import job_rows, stage_rows
from services.storage.statuses import FINAL_JOB_STATUSES, JobStatus


class PoisonJob(Exception):
    """The job cannot be driven any further: its stored request no longer validates, its
    strategy is unknown, or its records do not replay (the strategy changed under it). The
    message says which; the job fails with it."""


@dataclass
class JobView:
    id: str
    status: JobStatus
    cancel_requested: bool
    leases: Leases
    error: str | None
    batch_id: str | None
    request: JobRequest | None  # None for a poison job (see `poison`)
    records: dict[int, StageRecord] = field(default_factory=dict)
    now: float = 0.0  # the database's clock when the lock was taken (epoch seconds)
    created: float = 0.0  # when the job was submitted (database clock, epoch seconds)
    poison: str | None = None  # why the stored request is unusable

    @property
    def final(self) -> bool:
        return self.status in FINAL_JOB_STATUSES

    def progress(self) -> Pending | Finished:
        """What the job waits for next (a replay of its strategy over its records). Raises
        PoisonJob when the job cannot be driven."""
        if self.request is None:
            raise PoisonJob(self.poison or "the job's request is unusable")
        try:
            return advance(program_for(self.request), self.records)
        except Exception as error:  # ReplayMismatch, an unknown strategy, a strategy bug
            raise PoisonJob(f"the job cannot be replayed: {type(error).__name__}: {error}") from None

    def wanted(self) -> dict[int, Step]:
        """The steps the job waits for now, by seq (none once it is finished)."""
        progress = self.progress()
        return dict(progress.steps) if isinstance(progress, Pending) else {}


def lock(session: Session, job_id: str, with_records: bool = True) -> JobView | None:
    """Lock the job's row and read it (and its records): the start of every stage
    transaction. None for a missing job."""
    postgres = session.get_bind().dialect.name == "postgresql"
    if with_records and postgres:
        row = job_rows.lock_with_records(session, job_id)  # one round trip
        records = stage_rows.records_from_json(row.records) if row is not None else {}
    else:
        row = job_rows.lock(session, job_id)
        records = stage_rows.load_records(session, job_id) if with_records and row else {}
    if row is None:
        return None
    request, poison = None, None
    try:
        request = job_rows.request_of(row.question, row.strategy, row.params)
    except Exception as error:  # a row written by an older version, or edited by hand
        poison = f"the job's stored request is invalid: {error}"
    return JobView(
        id=row.id,
        status=JobStatus(row.status),
        cancel_requested=row.cancel_requested,
        leases=leases_from_json(row.leases),
        error=row.error,
        batch_id=row.batch_id,
        request=request,
        records=records,
        now=float(row.now),
        created=float(row.created or 0.0),
        poison=poison,
    )


def unsaved(job_id: str, request: JobRequest, batch_id: str | None, now: float) -> JobView:
    """A job not yet written (at submit, or fed from a batch): what its first transaction
    would see."""
    return JobView(
        id=job_id,
        status=JobStatus.QUEUED,
        cancel_requested=False,
        leases={},
        error=None,
        batch_id=batch_id,
        request=request,
        now=now,
    )


def as_stored(record: StageRecord) -> StageRecord:
    """The record as reading it back would give it (its output through JSON)."""
    return replace(record, output=json.loads(json.dumps(record.output)))
