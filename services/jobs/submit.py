"""Submit a job: insert it queued, with the leases of its first steps, in one transaction.

The caller publishes the returned tasks after the commit; a task lost between the commit and
the publish (a crashed API process, a broker that went away) is re-sent by the reconciler,
under the same lease.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from services.core.requests import JobRequest
from services.jobs.dispatch import grant_next
from services.jobs.leases import leases_to_json
from services.jobs.messages import StageTask
from services.jobs.view import unsaved
from services.storage import job_rows
from services.storage.db import add_unless_taken
from services.storage.models import Job, new_id


def submit(
    session: Session,
    owner: str,
    request: JobRequest,
    idempotency_key: str | None = None,
) -> tuple[Job, list[StageTask], bool]:
    """Insert a queued job; returns it, the tasks to publish once this commits, and True.
    With an idempotency key this owner used before: that job, no tasks, and False."""
    if idempotency_key:
        existing = job_rows.by_idempotency_key(session, owner, idempotency_key)
        if existing:
            return existing, [], False
    job = job_rows.new_job(owner, request, idempotency_key=idempotency_key)
    job.id = new_id("job")  # the messages name it before the insert
    view = unsaved(job.id, request, None, job_rows.db_now(session))
    tasks = grant_next(view)
    job.leases = leases_to_json(view.leases)
    earlier = add_unless_taken(
        session, job, lambda: job_rows.by_idempotency_key(session, owner, idempotency_key or "")
    )
    return (earlier, [], False) if earlier else (job, tasks, True)
