"""Cancel a job: one that is not running a stage right now ends at once; one that is ends at
that stage's boundary (the heartbeat aborts its generation where the engine allows, and
what was generated is recorded, so the job's cost stays true)."""

from __future__ import annotations

from sqlalchemy import func
from sqlalchemy.orm import Session

from services.jobs.view import lock
from services.storage import job_rows


def cancel(session: Session, job_id: str) -> None:
    """Cancel the job (the caller commits); a finished job is left as it is."""
    view = lock(session, job_id, with_records=False)
    if view is None or view.final:
        return
    if any(lease.held(view.now) for lease in view.leases.values()):
        job_rows.set_values(session, job_id, cancel_requested=True, updated_at=func.now())
    else:
        job_rows.mark_cancelled(session, job_id)
