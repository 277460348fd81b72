"""Run one stage of a job, from a queue message to its record: the worker's whole job.

    start (take the lease)  ->  execute the step, watched by the heartbeat  ->  record

and what happens when an attempt fails:
- a transient model error (a connection refused, a 5xx), a crash of our own code, or the
  stage's wall-clock limit: the lease is released and `RetryStage` tells the queue adapter
  to send the message again after a backoff; the next start counts another attempt, and
  `max_stage_attempts` of them fail the job with the last error;
- a model error worth reporting (a prompt too long, a bad model file): the job fails now;
- the job was cancelled meanwhile: the heartbeat aborted the generation; what was generated
  is recorded and the job ends cancelled at this boundary;
- the lease was taken over (this worker was presumed dead): the work is dropped.
Work that ran but is not recorded is counted (`tandem_stage_wasted_total`): the figure that
shows whether deliveries race.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import func

from services.core.backends.base import BackendError, Priority, TransientBackendError
from services.core.engines import Engines
from services.core.execution import execute
from services.jobs.heartbeat import CANCELLED, LEASE_LOST, TIMEOUT, Heartbeat
from services.jobs.leases import leases_to_json
from services.jobs.messages import Grant, StageTask
from services.jobs.record import Enqueue, record
from services.jobs.start import Started, start
from services.jobs.view import lock
from services.observability import JOB_SECONDS, STAGE_QUEUED, WASTED, observe_stage
from services.settings import Settings
from services.storage import job_rows
from services.storage.db import soft_transaction, transaction

log = logging.getLogger("tandem.jobs")


class RetryStage(Exception):
    """This attempt failed; deliver `grant` again after a backoff."""

    def __init__(self, reason: str, grant: Grant) -> None:
        super().__init__(reason)
        self.reason = reason
        self.grant = grant


@dataclass(frozen=True)
class StageContext:
    """What a worker process holds for running stages."""

    settings: Settings
    engines: Engines
    heartbeat: Heartbeat
    enqueue: Enqueue | None = None


def run_stage(
    context: StageContext,
    job_id: str,
    seq: int,
    grant: Grant | None,
    priority: Priority = Priority.INTERACTIVE,
) -> list[StageTask]:
    """Run step `seq` of a job if this delivery may (see `start`), at `priority` on its
    engine (the lane it came from); returns the tasks left to publish after the recording
    committed (normally none: they went out before it). Raises RetryStage when the attempt
    failed and should be tried again."""
    settings = context.settings
    url = settings.database_url
    started = start(
        url, job_id, seq, grant, settings.stage_deadline_s, settings.max_stage_attempts
    )
    if started is None:
        return []
    if started.queued_s is not None:
        STAGE_QUEUED.labels(started.step.kind).observe(max(0.0, started.queued_s))
    request_id = f"{job_id}:{seq}:{started.holder[:8]}"
    backend_role = started.step.role

    def abort() -> None:
        context.engines.backend(backend_role).abort(request_id)

    error: BaseException | None = None
    with context.heartbeat.watch(job_id, seq, started.holder, abort) as watch:
        try:
            done = execute(
                seq,
                started.step,
                context.engines,
                started.params,
                attempt=started.attempt,
                request_id=request_id,
                priority=priority,
            )
        except Exception as caught:
            error = caught
    retry = Grant(started.token, started.step, retry_of=started.holder)
    if watch.stopped == LEASE_LOST:
        return _wasted(started, "lease lost")
    if watch.stopped == TIMEOUT:
        limit = f"TANDEM_STAGE_TIMEOUT_S={settings.stage_timeout_s:g}"
        raise _failed_attempt(url, started, f"stage {seq} ran past {limit}", retry)
    if error is not None:
        if watch.stopped == CANCELLED:
            _settle_cancel(url, job_id)
            return _wasted(started, "cancelled")
        if isinstance(error, BackendError) and not isinstance(error, TransientBackendError):
            _fail(url, started, f"stage {seq} ({started.step.kind}) failed: {error}")
            return []
        if not isinstance(error, TransientBackendError):
            log.error("stage crashed", exc_info=error, extra={"job_id": job_id, "seq": seq})
        raise _failed_attempt(url, started, f"{type(error).__name__}: {error}", retry)
    try:
        result = record(url, started, done, context.enqueue, aborted=watch.stopped == CANCELLED)
    except Exception as failure:  # the database stayed away past the recording's retries
        WASTED.labels("recording failed").inc()
        raise _failed_attempt(url, started, f"recording failed: {failure}", retry) from None
    if not result.kept:
        return _wasted(started, result.reason)
    observe_stage(done)
    if result.finished is not None:
        JOB_SECONDS.labels(result.strategy, result.finished).observe(result.job_seconds)
    log.info("stage recorded", extra={"job_id": job_id, "seq": seq, "stage": done.kind})
    return result.unpublished


def _wasted(started: Started, reason: str) -> list[StageTask]:
    WASTED.labels(reason).inc()
    log.info(
        "stage ran but is not recorded: %s",
        reason,
        extra={"job_id": started.job_id, "seq": started.seq},
    )
    return []


def _failed_attempt(url: str, started: Started, error: str, retry: Grant) -> RetryStage:
    """Give the lease back (keeping its attempt count) and keep the error on the job, so a
    job failed by the attempt cap says why. If the database is unreachable the lease stays
    held; the retry may still start it (it carries `retry_of`)."""
    try:
        with soft_transaction(url) as session:
            view = lock(session, started.job_id, with_records=False)
            lease = view.leases.get(started.seq) if view else None
            if view is not None and lease is not None and lease.holder == started.holder:
                view.leases[started.seq] = lease.released()
                job_rows.set_values(
                    session,
                    view.id,
                    leases=leases_to_json(view.leases),
                    error=error,
                    updated_at=func.now(),
                )
    except Exception as also:
        log.warning("could not release the lease: %s", also, extra={"job_id": started.job_id})
    return RetryStage(error, retry)


def _fail(url: str, started: Started, error: str) -> None:
    """Fail the job, if this delivery still holds the stage (a replaced holder does not)."""
    with transaction(url) as session:
        view = lock(session, started.job_id, with_records=False)
        lease = view.leases.get(started.seq) if view else None
        if lease is not None and lease.holder == started.holder:
            job_rows.mark_failed(session, started.job_id, error)


def _settle_cancel(url: str, job_id: str) -> None:
    with transaction(url) as session:
        view = lock(session, job_id, with_records=False)
        if view is not None and not view.final and view.cancel_requested:
            job_rows.mark_cancelled(session, job_id)

