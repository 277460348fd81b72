"""The reconciler: the safety net that makes a lost message, a dead worker or a crash
between a commit and a publish cost time, never a job.

Each pass looks at unfinished jobs that made no progress for a stage deadline (database
clock) and, per stage the job waits for:
- no lease: grant one and send its message (a job whose first transaction never published);
- held by a live holder: nothing (it beats);
- held, but its holder stopped beating: a new token (the old holder is fenced off: it can no
  longer record) and a new message;
- granted, its message not started: send the *same* token's message again, with backoff
  (one deadline, then 2x, 4x, ... and 4x longer while the stage's queue still holds
  messages: during a cold start or a backlog the message is most likely waiting, not lost).
  Either copy may start the stage; the other finds the lease held and is dropped.
Every job is handled in its own transaction: a job that cannot be driven (a poison job: its
stored request or its records no longer replay) fails with the reason, and the pass goes on.
The reconciler's process also runs the batch feeder (`tandem reconcile`), in its own passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from sqlalchemy import func
from sqlalchemy.orm import Session

from services.core.workflow import Finished
from services.jobs.dispatch import task_for
from services.jobs.leases import Lease, granted, leases_to_json
from services.jobs.messages import StageTask
from services.jobs.view import JobView, PoisonJob, lock
from services.observability import REQUEUED
from services.settings import Settings
from services.storage import job_rows
from services.storage.db import transaction

log = logging.getLogger("tandem.reconciler")

Enqueue = Callable[[Sequence[StageTask]], None]
QueueDepth = Callable[[str], int]
MAX_BACKOFF_DOUBLINGS = 6  # re-sends of one message are at most 64 deadlines apart


def reconcile(
    settings: Settings,
    enqueue: Enqueue,
    deadline_s: float | None = None,
    queue_depth: QueueDepth | None = None,
    limit: int = 500,
) -> int:
    """One pass over stale jobs; returns how many jobs had a message (re)sent."""
    deadline = settings.stage_deadline_s if deadline_s is None else deadline_s
    url = settings.database_url
    with transaction(url) as session:
        stale = job_rows.stale_ids(session, deadline, limit)
    tasks = [task for job_id in stale for task in _reconcile_one(url, job_id, deadline, queue_depth)]
    resent = len({task.job_id for task in tasks})
    if tasks:
        enqueue(tasks)
        REQUEUED.inc(resent)
        log.info("reconciler re-sent the messages of %d job(s)", resent)
    return resent


def _reconcile_one(
    url: str, job_id: str, deadline_s: float, queue_depth: QueueDepth | None
) -> list[StageTask]:
    """One stale job in its own transaction; a job that breaks the pass fails instead."""
    try:
        with transaction(url) as session:
            view = lock(session, job_id)
            if view is None or view.final:
                return []
            if _ended(session, view):
                return []
            tasks = _due(view, deadline_s, queue_depth)
            values = {"leases": leases_to_json(view.leases), "updated_at": func.now()}
            job_rows.set_values(session, job_id, **values)
            return tasks
    except _BAD_DATA as error:  # one job's bad data must not stop the pass
        log.exception("reconciling a job failed", extra={"job_id": job_id})
        with transaction(url) as session:
            job_rows.mark_failed(session, job_id, f"the reconciler could not drive it: {error}")
    return []


# What one job's data can raise (a lease or a step that does not parse). Anything else (the
# database or the broker away) ends the pass, to be tried again, and fails no job.
_BAD_DATA = (PoisonJob, ValueError, TypeError, KeyError)


def _ended(session: Session, view: JobView) -> bool:
    """End a job that is over (cancelled with no stage running, finished, or poison)."""
    if view.cancel_requested and not any(lease.held(view.now) for lease in view.leases.values()):
        return job_rows.mark_cancelled(session, view.id)
    try:
        progress = view.progress()
    except PoisonJob as poison:
        return job_rows.mark_failed(session, view.id, str(poison))
    if isinstance(progress, Finished):
        return job_rows.mark_succeeded(session, view.id, progress.outcome)
    return False


def _due(view: JobView, deadline_s: float, queue_depth: QueueDepth | None) -> list[StageTask]:
    """The messages a stale job needs now; its leases are updated in `view`."""
    now = view.now
    wanted = view.wanted()
    view.leases = {seq: lease for seq, lease in view.leases.items() if seq in wanted}
    tasks = []
    for seq, step in wanted.items():
        lease = view.leases.get(seq)
        if lease is None:
            lease = granted(now)
        elif lease.held(now):
            continue
        elif lease.expired(now):
            lease = lease.regranted(now)
        else:
            task = task_for(view, seq, step, lease)
            backlog = queue_depth is not None and queue_depth(task.queue) > 0
            if not _resend_due(lease, now, deadline_s, backlog):
                continue
            lease = lease.resent_at(now)
        view.leases[seq] = lease
        tasks.append(task_for(view, seq, step, lease))
    return tasks


def _resend_due(lease: Lease, now: float, deadline_s: float, backlog: bool) -> bool:
    wait = deadline_s * 2 ** min(lease.resent, MAX_BACKOFF_DOUBLINGS) * (4 if backlog else 1)
    return now - lease.granted_at > wait
