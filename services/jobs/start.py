"""The start of a stage: a delivered message takes its stage's lease, or is dropped.

A message may start its stage only if its token is the lease's (not superseded by a re-grant,
not recorded since), nobody live holds the lease, the job is still running and not
cancelled, and the stage has attempts left. All of it is checked under the job's row lock,
so of several deliveries of one stage (a redelivery, the reconciler's re-send, a retry)
exactly one starts it; and a message published by a transaction that has not committed yet
waits here for that commit (the lock), then sees its lease, or, if that transaction rolled
back, finds no such token and is dropped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache

from sqlalchemy import func

from services.core.params import JobParams
from services.core.steps import Step
from services.core.strategies import is_strategy
from services.jobs.leases import granted, leases_to_json, new_token
from services.jobs.messages import Grant
from services.jobs.view import JobView, PoisonJob, lock
from services.storage import job_rows
from services.storage.db import soft_transaction, transaction
from services.storage.statuses import JobStatus

log = logging.getLogger("tandem.jobs")


@dataclass(frozen=True)
class Started:
    """A stage this delivery now holds: run `step`, then record it as `holder`."""

    job_id: str
    seq: int
    step: Step
    params: JobParams
    token: str  # the lease's
    holder: str
    attempt: int
    queued_s: float | None = None  # since its message was sent (database clock)


def start(
    url: str,
    job_id: str,
    seq: int,
    grant: Grant | None,
    deadline_s: float,
    max_attempts: int,
) -> Started | None:
    """Take the lease of step `seq` for this delivery; None drops the delivery. The common
    case is one statement (`job_rows.take_lease`); anything unusual (a stale or duplicate
    message, a cancel, the attempt cap, a job that cannot be driven) is sorted out under the
    row lock by `_start_checked`."""
    if grant is not None:
        started = _start_granted(url, job_id, seq, grant, deadline_s, max_attempts)
        if started is not None:
            return started
    return _start_checked(url, job_id, seq, grant, deadline_s, max_attempts)


def _start_granted(
    url: str, job_id: str, seq: int, grant: Grant, deadline_s: float, max_attempts: int
) -> Started | None:
    holder = new_token()
    with transaction(url) as session:  # the statement commits without waiting for the disk
        row = job_rows.take_lease(
            session, job_id, seq, grant.token, holder, grant.retry_of, deadline_s, max_attempts
        )
        if row is None:
            return None
        try:
            params = params_of(row.strategy, json.dumps(row.params, sort_keys=True))
        except ValueError:  # a job that cannot be driven: undo, and let the checks fail it
            session.rollback()
            return None
    return Started(job_id, seq, grant.step, params, grant.token, holder, row.attempt, row.queued_s)


@lru_cache(maxsize=1024)
def params_of(strategy: str, params_json: str) -> JobParams:
    """A job's params (validated once per distinct value; raises ValueError if invalid)."""
    if not is_strategy(strategy):
        raise ValueError(f"unknown strategy {strategy!r}")
    return JobParams.model_validate_json(params_json)


def _start_checked(
    url: str,
    job_id: str,
    seq: int,
    grant: Grant | None,
    deadline_s: float,
    max_attempts: int,
) -> Started | None:
    with soft_transaction(url) as session:
        view = lock(session, job_id, with_records=grant is None)
        if view is None or view.final:
            return None
        if view.cancel_requested:
            job_rows.mark_cancelled(session, job_id)
            return None
        try:
            step = grant.step if grant is not None else _ungranted_step(view, seq)
        except PoisonJob as poison:
            job_rows.mark_failed(session, job_id, str(poison))
            return None
        lease = view.leases.get(seq)
        if step is None or lease is None or (grant is not None and lease.token != grant.token):
            return None  # recorded since, or superseded by a re-grant whose message is out
        if lease.held(view.now) and not (grant is not None and grant.retry_of == lease.holder):
            return None  # a live holder runs it; if it dies, the reconciler re-grants
        if lease.attempts >= max_attempts:
            job_rows.mark_failed(session, job_id, _attempts_exhausted(view, seq, step, max_attempts))
            return None
        if view.request is None:
            job_rows.mark_failed(session, job_id, view.poison or "the job's request is unusable")
            return None
        holder = new_token()
        view.leases[seq] = lease.started(holder, view.now, deadline_s)
        values = {"leases": leases_to_json(view.leases), "attempts": job_rows.JOBS.c.attempts + 1}
        if view.status is JobStatus.QUEUED:
            job_rows.mark_running(session, job_id, **values)
        else:
            job_rows.set_values(session, job_id, updated_at=func.now(), **values)
        lease = view.leases[seq]
        return Started(job_id, seq, step, view.request.params, lease.token, holder, lease.attempts)


def _ungranted_step(view: JobView, seq: int) -> Step | None:
    """A message without a lease token (sent before leases had tokens): the step, if the job
    waits for it, with a lease granted now unless it has one."""
    step = view.wanted().get(seq)
    if step is not None and seq not in view.leases:
        view.leases[seq] = granted(view.now)
    return step


def _attempts_exhausted(view: JobView, seq: int, step: Step, max_attempts: int) -> str:
    reason = f"last error: {view.error}" if view.error else "worker lost"
    return f"stage {seq} ({step.kind}) did not complete after {max_attempts} attempts ({reason})"
