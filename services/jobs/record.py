"""The end of a stage: its record and the job's next state, in one transaction.

Under the job's row lock: the stage is recorded only if this delivery still holds its lease
(fencing: a holder presumed dead and replaced cannot record) and the job still runs; the
strategy is replayed over the records to find what follows; the next steps get their leases
and their messages are published *before the commit*, so their transit to the next worker
overlaps this transaction's writes. That is safe because a message can only start its stage
once its lease is committed: the receiving worker's start waits for this row lock, and if
this transaction rolls back it finds no such lease and drops the message (no stage runs
whose predecessor was not recorded).

A recording that fails on a database error is tried again in this process (the model's
work is in hand) for up to `RECORD_RETRY_S`; only then does the stage's attempt fail.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.exc import DBAPIError

from services.core.steps import StageRecord
from services.core.workflow import Finished
from services.jobs.dispatch import grant_next
from services.jobs.leases import leases_to_json
from services.jobs.messages import StageTask
from services.jobs.start import Started
from services.jobs.view import PoisonJob, as_stored, lock
from services.storage import job_rows, stage_rows
from services.storage.db import transaction
from services.storage.models import utcnow
from services.storage.statuses import JobStatus

log = logging.getLogger("tandem.jobs")

RECORD_RETRY_S = 30.0  # how long a recording is retried through database errors

Enqueue = Callable[[Sequence[StageTask]], None]


@dataclass
class Recorded:
    """What became of a finished stage: `kept` (recorded), or the reason it was not; and
    the tasks that still need publishing (the early publish failed)."""

    kept: bool
    reason: str = ""
    unpublished: list[StageTask] = field(default_factory=list)
    finished: JobStatus | None = None  # the job's status, if this stage ended it
    strategy: str = ""
    job_seconds: float = 0.0  # submitted -> ended, when this stage ended the job


def record(
    url: str,
    started: Started,
    record: StageRecord,
    enqueue: Enqueue | None,
    aborted: bool = False,
) -> Recorded:
    """Record a finished stage, retrying through database errors (see the module docstring).
    `aborted`: its generation was cut short by a cancel, so the job ends cancelled even if
    this was its last stage (a partial answer is not a result)."""
    deadline = time.monotonic() + RECORD_RETRY_S
    pause = 0.05
    finished_at = utcnow()
    while True:
        try:
            return _record_once(url, started, record, enqueue, finished_at, aborted)
        except DBAPIError as error:
            if time.monotonic() + pause > deadline or not _retryable(error):
                raise
            log.warning("recording failed, retrying: %s", str(error).splitlines()[0],
                        extra={"job_id": started.job_id, "seq": started.seq})
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 2.0)


def _retryable(error: DBAPIError) -> bool:
    """A lost connection, a restarting server, a deadlock: not a constraint or a bug."""
    sqlstate = getattr(error.orig, "sqlstate", None) or ""
    return error.connection_invalidated or sqlstate[:2] in ("", "08", "40", "53", "57")


def _record_once(
    url: str,
    started: Started,
    record: StageRecord,
    enqueue: Enqueue | None,
    finished_at: datetime,
    aborted: bool,
) -> Recorded:
    with transaction(url) as session:
        view = lock(session, started.job_id)
        if view is None or view.final:
            return Recorded(False, "job finished")
        lease = view.leases.get(started.seq)
        if lease is None or lease.holder != started.holder:
            return Recorded(False, "lease lost")
        view.records[started.seq] = as_stored(record)
        del view.leases[started.seq]
        try:
            progress = view.progress()
            cancelled = view.cancel_requested and (aborted or not isinstance(progress, Finished))
            tasks = [] if isinstance(progress, Finished) or cancelled else grant_next(view)
        except PoisonJob as poison:
            job_rows.mark_failed(session, view.id, str(poison))
            return Recorded(False, "poison job", finished=JobStatus.FAILED)
        unpublished = tasks if enqueue is None else _publish_early(enqueue, tasks, view.id)
        leases = leases_to_json(view.leases)
        if not cancelled and not isinstance(progress, Finished):
            if not stage_rows.record_and_advance(session, view.id, record, finished_at, leases):
                raise RuntimeError(f"stage {started.seq} of {view.id} recorded twice under a lease")
            return Recorded(True, unpublished=unpublished)
        if not stage_rows.add_stage(session, view.id, record, created_at=finished_at):
            raise RuntimeError(f"stage {started.seq} of {view.id} recorded twice under a lease")
        ended = {"strategy": view.request.strategy, "job_seconds": view.now - view.created}
        if cancelled:
            job_rows.mark_cancelled(session, view.id, leases=leases)
            return Recorded(True, finished=JobStatus.CANCELLED, **ended)
        job_rows.mark_succeeded(session, view.id, progress.outcome, leases=leases)
        return Recorded(True, finished=JobStatus.SUCCEEDED, **ended)


def _publish_early(enqueue: Enqueue, tasks: list[StageTask], job_id: str) -> list[StageTask]:
    """Enqueue before the commit; returns what is left to publish after it ([] on success;
    all of them if the broker is down: the caller tries again, then the reconciler)."""
    if not tasks:
        return []
    try:
        enqueue(tasks)
    except Exception as error:
        log.warning("publish before commit failed: %s", error, extra={"job_id": job_id})
        return tasks
    return []
