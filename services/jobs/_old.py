"""A job's life in service mode: submit, run one stage, decide what comes next, cancel,
reconcile. Storage is Postgres (the source of truth); a queue message carries (job id,
seq) and, when handed off, the lease token and the step computed from Postgres.

Delivery is at-least-once with exactly-once effect:
- a stage's record and the job's new state commit in one transaction, under the job's row
  lock;
- a stage is recorded only if the job, as committed, asks for exactly that step at that
  seq (a replay of its strategy over the records). That is what lets a worker publish
  the next steps as soon as it knows them, before Postgres confirms them: a handed-off
  stage's message carries the job's history, so its worker replays it with its own
  record and publishes at once; otherwise the recording transaction publishes before it
  writes. The next model call overlaps the bookkeeping. If the transaction then fails or
  finds other steps, an early message's stage is not recorded (the right steps are
  published by the transaction, or by the stage's redelivery);
- a stage already recorded is never run or written again (unique (job_id, seq));
- a parallel group (SCoT's drafts) is enqueued once, by whoever records the step before it;
- a worker takes a lease on a stage before calling the model, counting the stage's attempt
  in Postgres: a duplicate delivery finds the live lease and is dropped, and a stage that
  keeps killing its worker fails the job after the cap instead of looping;
- hand-off: the transaction that records a stage (or submits the job) also takes the
  leases of the steps that follow (counting their attempts) with fresh tokens, and their
  messages carry the token and the step. The first delivery of such a message (a token
  is used once, in Redis) runs the step without a claim transaction, unless the job was
  cancelled since (a Redis flag the API sets after the cancel commits); any other
  delivery takes the full claim above. A job reads `queued` until the worker of its first
  stage marks it running (a heartbeat at once, beside the model call);
- while a stage runs, its worker heartbeats the lease (and the job's updated_at), so a slow
  stage is never mistaken for a lost one; a failed attempt releases its lease at once;
- the reconciler re-enqueues the frontier of unfinished jobs with no heartbeat or progress
  for longer than the stage deadline (a dead worker, a lost message, a Redis restart, a
  crash between commit and enqueue).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from redis import RedisError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from services.broker import Broker
from services.core.backends.base import BackendError, TransientBackendError
from services.core.engines import Engines
from services.core.execution import execute
from services.core.params import JobParams
from services.core.requests import JobRequest
from services.core.steps import QUEUE_OF_ROLE, StageRecord, Step, step_from_json, step_to_json
from services.core.strategies import program_for
from services.core.workflow import Finished, Pending, ReplayMismatch, advance
from services.observability import REQUEUED, observe_stage
from services.settings import Settings
from services.storage import repository
from services.storage.db import transaction
from services.storage.models import FINAL_JOB_STATUSES, Batch, Job, Stage, new_id, utcnow
from services.storage.repository import RECORD_FIELDS

log = logging.getLogger("tandem.jobs")

# Largest stage output a hand-off message carries, in characters of JSON.
MAX_HISTORY_CHARS = 64_000


@dataclass(frozen=True)
class Task:
    """A message to put on a queue: run step `seq` of job `job_id`. A task handed off by
    the stage before it also carries the lease token, the step and the job's params, so
    its first delivery starts at once (see `_take_handoff`)."""

    job_id: str
    seq: int
    queue: str
    handoff: dict[str, Any] | None = None


Enqueue = Callable[[Sequence[Task]], None]


class RetryLater(Exception):
    """A transient model error: the queue should redeliver after a backoff."""


def tasks_for(job_id: str, steps: Sequence[tuple[int, Step]]) -> list[Task]:
    return [Task(job_id, seq, QUEUE_OF_ROLE[step.role]) for seq, step in steps]


def frontier(job: Job, session: Session) -> Pending | Finished:
    records = repository.load_records(session, job.id)
    return advance(program_for(repository.job_request(job)), records)


# --- submit -----------------------------------------------------------------------------


def submit(
    session: Session,
    owner: str,
    request: JobRequest,
    idempotency_key: str | None = None,
    deadline_s: float | None = None,
) -> tuple[Job, list[Task], bool]:
    """Insert a queued job and return it with its first tasks (to enqueue after commit).
    With `deadline_s`, the first steps are handed off as any stage's successors are: their
    leases are taken in this transaction, so the worker that receives one starts the model
    at once instead of claiming it first. With an idempotency key already used by this
    owner, return that job and no tasks."""
    if idempotency_key:
        existing = _by_idempotency_key(session, owner, idempotency_key)
        if existing:
            return existing, [], False
    job = repository.new_job(owner, request, idempotency_key=idempotency_key)
    job.id = new_id("job")  # the messages name it before the insert
    steps = _first_steps(request)
    if deadline_s is None:
        tasks = tasks_for(job.id, steps)
    else:
        leases: dict[str, Any] = {}
        unrecorded = _unlocked_view(job.id, request, status="queued")
        tasks = _hand_off(unrecorded, steps, leases, deadline_s)
        job.leases = leases
    earlier = repository.add_unless_taken(
        session, job, lambda: _by_idempotency_key(session, owner, idempotency_key or "")
    )
    return (earlier, [], False) if earlier else (job, tasks, True)


def _unlocked_view(
    job_id: str,
    request: JobRequest,
    status: str,
    records: dict[int, StageRecord] | None = None,
    batch_id: str | None = None,
) -> LockedJob:
    """A job as a stage transaction would see it, built without reading Postgres (at
    submit, or from a hand-off's history): enough to decide and hand off its next steps."""
    return LockedJob(
        id=job_id,
        status=status,
        cancel_requested=False,
        leases={},
        error=None,
        batch_id=batch_id,
        request=request,
        records=records or {},
    )


def first_tasks(job: Job) -> list[Task]:
    return tasks_for(job.id, _first_steps(repository.job_request(job)))


def _first_steps(request: JobRequest) -> tuple[tuple[int, Step], ...]:
    progress = advance(program_for(request), {})
    return progress.steps if isinstance(progress, Pending) else ()


def _by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))


# --- run one stage ----------------------------------------------------------------------


def run_stage(
    settings: Settings,
    engines: Engines,
    job_id: str,
    seq: int,
    handoff: dict[str, Any] | None = None,
    broker: Broker | None = None,
    enqueue: Enqueue | None = None,
) -> list[Task]:
    """Run step `seq` of a job and record it. The tasks that follow go to `enqueue` as
    soon as they are known (see the module docstring): for a handed-off stage, from the
    history its message carried, before any database round trip; else from the recording
    transaction, before it writes. Without `enqueue`, or if the broker is down, they are
    returned, for the caller to enqueue after the commit."""
    url = settings.database_url
    claim = _take_handoff(job_id, handoff, broker) if handoff and broker else None
    history = handoff if claim is not None else None  # a redelivery's may be stale
    claim = claim or _claim(settings, job_id, seq)
    if claim is None:
        return []
    params, step = claim
    starts_job = bool(history and history.get("starts_job"))
    try:
        with heartbeat(url, job_id, seq, settings.stage_deadline_s, starts_job):
            record = execute(seq, step, engines, params, request_id=f"{job_id}:{seq}")
    except BackendError as error:
        if isinstance(error, TransientBackendError):
            _release(url, job_id, seq)
            raise
        _fail(url, job_id, f"stage {seq} ({step.kind}) failed: {error}")
        return []
    except BaseException:
        _release(url, job_id, seq)  # let the redelivery claim it at once
        raise
    finished_at = utcnow()
    sent: list[Task] = []
    if enqueue is not None and history and "records" in history:
        sent = _publish_early(enqueue, _predicted(job_id, record, history, settings), job_id)
    with transaction(url) as session:
        job = _lock_with_records(session, job_id)
        if job is None or job.status in FINAL_JOB_STATUSES or not _wanted(job, seq, step):
            return []  # recorded by a duplicate delivery (which enqueued what follows), or
            # run on an early message whose sender's transaction then failed
        job.records[seq] = as_stored(record)
        next_steps, values = _next(job)
        leases = {k: v for k, v in job.leases.items() if k != str(seq)}
        tasks = _hand_off(job, next_steps, leases, settings.stage_deadline_s, sent)
        tasks = [task for task in tasks if task not in sent]
        if enqueue is not None and _publish_early(enqueue, tasks, job_id):
            tasks = []
        if not repository.add_stage(session, job_id, record, created_at=finished_at):
            log.error("stage %s recorded under our row lock", seq, extra={"job_id": job_id})
            return []
        if job.status == "queued":  # its start beat has not landed (or the stage was quick)
            values = {**_started(), **values}
        _update(session, job_id, leases=leases, **{"updated_at": utcnow(), **values})
    observe_stage(record)
    log.info("stage recorded", extra={"job_id": job_id, "seq": seq, "stage": record.kind})
    return tasks


def _wanted(job: LockedJob, seq: int, step: Step) -> bool:
    """Whether the job, as recorded, asks for exactly `step` as step `seq` now."""
    try:
        progress = advance(program_for(job.request), job.records)
    except ReplayMismatch:
        return False  # the claim of the redelivery fails the job with the reason
    return isinstance(progress, Pending) and dict(progress.steps).get(seq) == step


def _publish_early(enqueue: Enqueue, tasks: list[Task], job_id: str) -> list[Task]:
    """Publish before the commit; returns what was published ([] if the broker is down:
    the tasks then go out after the commit, or through the reconciler)."""
    if not tasks:
        return []
    try:
        enqueue(tasks)
    except Exception as error:
        log.warning("early publish failed: %s", error, extra={"job_id": job_id})
        return []
    return tasks


def _predicted(
    job_id: str, record: StageRecord, handoff: dict[str, Any], settings: Settings
) -> list[Task]:
    """The tasks that follow `record`, from the job's history its hand-off carried: known
    before any database round trip. The recording transaction then checks them against
    Postgres (and publishes the right ones itself if the history was stale, e.g. a sibling
    of a parallel group recorded since)."""
    try:
        request = repository.request_of(handoff["question"], handoff["strategy"], handoff["params"])
        records = {r["seq"]: StageRecord(**r) for r in handoff["records"]}
        records[record.seq] = as_stored(record)
        job = _unlocked_view(job_id, request, "running", records, handoff.get("batch_id"))
        next_steps, _ = _next(job)
    except Exception:  # only a shortcut: the transaction still finds the next steps
        log.exception("no early hand-off", extra={"job_id": job_id})
        return []
    return _hand_off(job, next_steps, {}, settings.stage_deadline_s)


def _hand_off(
    job: LockedJob,
    steps: Sequence[tuple[int, Step]],
    leases: dict[str, Any],
    deadline_s: float,
    sent: Sequence[Task] = (),
) -> list[Task]:
    """Claim the next steps for whoever receives their messages, in the transaction that
    records the stage before them: each gets a lease (its attempt counted) with a fresh
    token, and its message carries the token, the step and the job's history. The
    receiving worker then skips the claim transaction, the costliest part of a queue hop,
    and can hand off in turn before it touches Postgres. A step already `sent` (published
    early, from the same history) keeps its task and token."""
    history: dict[str, Any] | None = None  # built once, and only for a new message
    tasks = []
    for seq, step in steps:
        early = next((t for t in sent if t.seq == seq and t.handoff), None)
        if early is not None and step_from_json(early.handoff["step"]) == step:  # type: ignore[index]
            token, task = early.handoff["token"], early  # type: ignore[index]
        else:
            token = uuid.uuid4().hex
            history = history or _history(job)
            handoff = {**history, "token": token, "step": step_to_json(step)}
            task = Task(job.id, seq, QUEUE_OF_ROLE[step.role], handoff)
        lease = _lease(leases.get(str(seq), {}), deadline_s, claim=True)
        leases[str(seq)] = {**lease, "token": token}
        tasks.append(task)
    return tasks


def _history(job: LockedJob) -> dict[str, Any]:
    """What a receiver needs to decide the steps after its own: the request and the
    records. Left out when large (a long relay, say): the receiver then learns the next
    steps from Postgres, as a worker without a hand-off does."""
    history = {
        "params": repository.stored_params(job.request.params),
        "batch_id": job.batch_id,
        # Submit hands off the first steps of a job still queued: the receiver marks it
        # running (see `heartbeat`).
        "starts_job": job.status == "queued",
        "question": job.request.question,
        "strategy": job.request.strategy,
        "records": [record.to_dict() for _, record in sorted(job.records.items())],
    }
    if sum(len(json.dumps(r["output"])) for r in history["records"]) > MAX_HISTORY_CHARS:
        del history["records"]
    return history


def _take_handoff(
    job_id: str, handoff: dict[str, Any], broker: Broker
) -> tuple[JobParams, Step] | None:
    """The step of a handed-off task on its first delivery, if its job was not cancelled
    since; None sends the delivery through the full claim, which sorts out a redelivery
    (the lease still holds it off, or has expired and is claimed again, counting an
    attempt) and a cancelled job. Redis marks a token used, so only one delivery of a
    message takes the short way."""
    try:
        if not broker.take_handoff(handoff["token"], job_id, handoff.get("batch_id")):
            return None
        return JobParams.model_validate(handoff["params"]), step_from_json(handoff["step"])
    except (RedisError, KeyError, TypeError, ValueError) as error:
        log.warning("hand-off not taken: %s", error, extra={"job_id": job_id})
        return None


@contextmanager
def heartbeat(
    url: str, job_id: str, seq: int, deadline_s: float, starts_job: bool = False
) -> Iterator[None]:
    """While a stage runs, keep its lease and the job's updated_at fresh, so neither a
    duplicate delivery nor the reconciler takes a slow stage for a lost one. The stage
    that starts a job (handed off by submit, so nobody claimed it) beats at once, which
    marks the job running while the model works."""
    stop = threading.Event()

    def beat() -> None:
        pause = 0.0 if starts_job else deadline_s / 3
        while not stop.wait(pause):
            pause = deadline_s / 3
            try:
                with transaction(url) as session:
                    job = _locked(session, job_id)
                    if job is None or job.status not in ("queued", "running"):
                        return
                    if job.status == "queued":
                        _update(session, job_id, **_started())
                    _extend_lease(job, seq, deadline_s)
            except Exception as error:  # a missed beat is not fatal; the next may land
                log.warning("heartbeat failed: %s", error, extra={"job_id": job_id, "seq": seq})

    thread = threading.Thread(target=beat, name=f"heartbeat-{job_id}-{seq}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _started() -> dict[str, Any]:
    """A queued job's values once a stage of it runs."""
    return {
        "status": "running",
        "attempts": JOBS.c.attempts + 1,
        "started_at": func.coalesce(JOBS.c.started_at, utcnow()),
    }


def as_stored(record: StageRecord) -> StageRecord:
    """The record as reading it back would give it (its output through JSON)."""
    return replace(record, output=json.loads(json.dumps(record.output)))


def _lease(lease: dict[str, Any], deadline_s: float, claim: bool = False) -> dict[str, Any]:
    """A stage's lease expiring `deadline_s` from now; a claim also counts an attempt."""
    attempts = lease.get("attempts", 0) + (1 if claim else 0)
    return {**lease, "attempts": attempts, "until": time.time() + deadline_s}


def _extend_lease(job: Job, seq: int, deadline_s: float) -> None:
    leases = dict(job.leases or {})
    leases[str(seq)] = _lease(leases.get(str(seq), {}), deadline_s)
    job.leases = leases  # a new dict, so the JSON column is seen as changed
    job.updated_at = utcnow()


def _release(url: str, job_id: str, seq: int) -> None:
    """Expire a stage's lease now (its attempt failed), keeping its attempt count."""
    with transaction(url) as session:
        job = _locked(session, job_id)
        if job is not None and str(seq) in (job.leases or {}):
            leases = dict(job.leases)
            leases[str(seq)] = {**leases[str(seq)], "until": 0}
            job.leases = leases


def _claim(settings: Settings, job_id: str, seq: int) -> tuple[JobParams, Step] | None:
    """Take the lease on step `seq` if the job still wants it and nobody holds it, counting
    the attempt. Returns the step to run, or None for a delivery to drop: the job is over,
    the step is already recorded (its recorder enqueued what follows; if that enqueue was
    lost, the reconciler re-enqueues), or another worker holds a live lease on it."""
    with transaction(settings.database_url) as session:
        job = _lock_with_records(session, job_id)
        if job is None or job.status in FINAL_JOB_STATUSES:
            return None
        if job.cancel_requested:
            _update(session, job_id, **repository.cancelled_values())
            return None
        try:
            progress = advance(program_for(job.request), job.records)
        except ReplayMismatch as error:
            reason = f"the job's strategy changed under it: {error}"
            _update(session, job_id, **repository.failed_values(reason))
            return None
        if isinstance(progress, Finished):
            _update(session, job_id, **repository.succeeded_values(progress.outcome))
            return None
        wanted = dict(progress.steps)
        lease = job.leases.get(str(seq), {})
        if seq not in wanted or lease.get("until", 0) > time.time():
            return None
        if lease.get("attempts", 0) >= settings.max_stage_attempts:
            reason = f"last error: {job.error}" if job.error else "worker lost"
            message = (
                f"stage {seq} ({wanted[seq].kind}) did not complete after "
                f"{settings.max_stage_attempts} attempts ({reason})"
            )
            _update(session, job_id, **repository.failed_values(message))
            return None
        leases = {**job.leases, str(seq): _lease(lease, settings.stage_deadline_s, claim=True)}
        now = utcnow()
        _update(
            session,
            job_id,
            leases=leases,
            attempts=JOBS.c.attempts + 1,
            status="running",
            started_at=func.coalesce(JOBS.c.started_at, now),
            updated_at=now,
        )
        return job.request.params, wanted[seq]


def _next(job: LockedJob) -> tuple[tuple[tuple[int, Step], ...], dict[str, Any]]:
    """After a stage is recorded: the steps to enqueue next and the job's new state."""
    progress = advance(program_for(job.request), job.records)
    if isinstance(progress, Finished):
        return (), repository.succeeded_values(progress.outcome)
    if job.cancel_requested:
        return (), repository.cancelled_values()
    return (progress.steps if _group_is_fresh(progress) else ()), {}


def _group_is_fresh(progress: Pending) -> bool:
    """No step of the group is recorded yet: nobody has enqueued it (or it was lost)."""
    return len(progress.steps) == len(progress.group)


def _locked(session: Session, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id).with_for_update())


JOBS, STAGES = Job.__table__, Stage.__table__
_JOB_COLUMNS = ("id", "status", "cancel_requested", "leases", "error", "question", "strategy")
_JOB_COLUMNS += ("params", "batch_id")


@dataclass
class LockedJob:
    """What a stage transaction needs of a job: its state and its records so far."""

    id: str
    status: str
    cancel_requested: bool
    leases: dict[str, Any]
    error: str | None
    batch_id: str | None
    request: JobRequest
    records: dict[int, StageRecord]


def _lock_with_records(session: Session, job_id: str) -> LockedJob | None:
    """Lock the job's row and read it with its stage records, in one round trip (the
    queue hop's hot path: plain SQL rows, no ORM objects)."""
    stage_columns = [STAGES.c.seq.label("stage_seq")]
    stage_columns += [STAGES.c[name].label(f"stage_{name}") for name in RECORD_FIELDS]
    query = (
        select(*(JOBS.c[name] for name in _JOB_COLUMNS), *stage_columns)
        .select_from(JOBS.outerjoin(STAGES, STAGES.c.job_id == JOBS.c.id))
        .where(JOBS.c.id == job_id)
        .order_by(STAGES.c.seq)
        .with_for_update(of=JOBS)
    )
    rows = [row._mapping for row in session.execute(query)]
    if not rows:
        return None
    first = rows[0]
    records = {
        row["stage_seq"]: StageRecord(
            seq=row["stage_seq"], **{name: row[f"stage_{name}"] for name in RECORD_FIELDS}
        )
        for row in rows
        if row["stage_seq"] is not None
    }
    request = repository.request_of(first["question"], first["strategy"], first["params"])
    return LockedJob(
        id=job_id,
        status=first["status"],
        cancel_requested=first["cancel_requested"],
        leases=dict(first["leases"] or {}),
        error=first["error"],
        batch_id=first["batch_id"],
        request=request,
        records=records,
    )


def _update(session: Session, job_id: str, **values: Any) -> None:
    session.execute(update(JOBS).where(JOBS.c.id == job_id).values(**values))


def _fail(url: str, job_id: str, error: str) -> None:
    with transaction(url) as session:
        job = _locked(session, job_id)
        if job is not None and job.status not in FINAL_JOB_STATUSES:
            repository.mark_failed(job, error)


def note_error(url: str, job_id: str, error: str) -> None:
    """Keep the last error of an unfinished job, so a job failed by the attempt cap says why."""
    with transaction(url) as session:
        job = _locked(session, job_id)
        if job is not None and job.status not in FINAL_JOB_STATUSES:
            job.error = error


# --- cancel and reconcile -----------------------------------------------------------------


def request_cancel(session: Session, job: Job) -> None:
    """Cancel a job: queued ones end now; running ones stop at the next stage boundary
    (the stage in flight finishes, its record is kept, nothing further runs)."""
    if job.status in FINAL_JOB_STATUSES:
        return
    job.cancel_requested = True
    if job.status == "queued":
        repository.mark_cancelled(job)
    job.updated_at = utcnow()


def stuck_jobs(session: Session, deadline_s: float, limit: int = 500) -> list[Job]:
    cutoff = utcnow() - timedelta(seconds=deadline_s)
    # A batch's jobs past its feed cursor wait for the batch feeder, not for a lost message.
    unfed = select(Batch.id).where(Batch.id == Job.batch_id, Job.line > Batch.fed_through_line)
    return list(
        session.scalars(
            select(Job)
            .where(Job.status.in_(("queued", "running")), Job.updated_at < cutoff)
            .where(~unfed.exists())
            .order_by(Job.updated_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


def reconcile(
    settings: Settings,
    enqueue: Enqueue,
    deadline_s: float | None = None,
    queue_depth: Callable[[str], int] | None = None,
) -> int:
    """Re-enqueue the frontier of jobs that made no progress within the deadline; returns
    how many jobs were re-enqueued.

    A job can look stuck while its message simply waits behind a long queue (a big batch).
    So while its queue still holds messages, it is re-enqueued only after four deadlines;
    once the queue is empty, a stuck job's message is surely gone (a lost Redis, a crash
    between commit and enqueue) and it is re-enqueued at once. Duplicates are harmless
    (stage writes are idempotent); this only keeps them rare."""
    deadline_s = settings.stage_deadline_s if deadline_s is None else deadline_s
    long_ago = utcnow() - timedelta(seconds=4 * deadline_s)
    tasks: list[Task] = []
    with transaction(settings.database_url) as session:
        for job in stuck_jobs(session, deadline_s):
            if job.cancel_requested:
                repository.mark_cancelled(job)
                continue
            progress = frontier(job, session)
            if isinstance(progress, Finished):
                repository.mark_succeeded(job, progress.outcome)
                continue
            due = tasks_for(job.id, progress.steps)
            backlog = queue_depth and any(queue_depth(task.queue) > 0 for task in due)
            if backlog and job.updated_at > long_ago:
                continue
            tasks.extend(due)
            job.updated_at = utcnow()
    requeued = len({task.job_id for task in tasks})
    if tasks:
        enqueue(tasks)
        REQUEUED.inc(requeued)
        log.info("reconciler re-enqueued %d tasks", len(tasks))
    _feed_batches(settings, enqueue, queue_depth)
    return requeued


def _feed_batches(
    settings: Settings, enqueue: Enqueue, queue_depth: Callable[[str], int] | None
) -> None:
    """Batches put their jobs on the queues gradually: each reconciler pass tops them up."""
    from services.optional import present

    for batches in present("services.batches"):
        batches.feed(settings, enqueue, queue_depth)
