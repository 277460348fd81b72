"""The batch feeder: batch jobs reach the queues gradually, shallowly and fairly.

- Shallow: a role's batch lanes (`<role>.batch`, `<role>.batch-new`) are kept at about
  `TANDEM_FEED_DEPTH_FACTOR` times the stages that role's workers can run at once (their
  announced capacity; `TANDEM_FEED_MIN_DEPTH` when none is known). Postgres holds the
  backlog, so an interactive stage never waits behind a deep list, and a batch submitted
  later is not stuck behind another's thousands of messages.
- Fair: owners take turns, each turn feeding an equal share of the room, so a 100-line
  batch is fed alongside a 1,000,000-line batch of another owner that started earlier.
  Within one owner, batches are fed in the order they were created.
- Leased: a fed job's first steps get their leases in the same transaction that moves the
  batch's feed cursor (`fed_through_line`), exactly as a submitted job's do.

A job that cannot be driven (a poison job) fails with the reason; the others are fed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import bindparam, func, update
from sqlalchemy.orm import Session

from services.batches.lifecycle import expire_overdue, fail_stale_uploads, finalize_finished
from services.jobs.dispatch import grant_next
from services.jobs.leases import leases_to_json
from services.jobs.messages import StageTask
from services.jobs.view import PoisonJob, unsaved
from services.queues import ROLES, Lane, queue_name
from services.settings import Settings
from services.storage import batch_rows, job_rows
from services.storage.db import transaction
from services.storage.models import Job
from services.storage.statuses import BatchStatus, JobStatus

log = logging.getLogger("tandem.feeder")

Enqueue = Callable[[Sequence[StageTask]], None]
QueueDepth = Callable[[str], int]
Capacity = Callable[[], dict[str, int]]
FEED_CHUNK = 1000  # jobs one feeder transaction takes at most


@dataclass
class Room:
    """Messages each role's batch lanes may still take in this pass."""

    left: dict[str, int] = field(default_factory=dict)

    @classmethod
    def measure(
        cls, settings: Settings, queue_depth: QueueDepth | None, capacity: Capacity | None
    ) -> Room:
        slots = capacity() if capacity is not None else {}
        room = {}
        for role in ROLES:
            target = max(
                settings.feed_min_depth, int(settings.feed_depth_factor * slots.get(role, 0))
            )
            waiting = 0
            if queue_depth is not None:
                waiting = sum(queue_depth(queue_name(role, lane)) for lane in _BATCH_LANES)
            room[role] = target - waiting
        return cls(room)

    def total(self) -> int:
        return sum(max(0, n) for n in self.left.values())

    def largest(self) -> int:
        return max((n for n in self.left.values()), default=0)

    def share(self, tasks: Sequence[StageTask], turns: int) -> int:
        """Messages one of `turns` owners may take now for the role of `tasks` (at least
        what these tasks need, so every turn makes progress when there is room)."""
        role = tasks[0].queue.split(".", 1)[0] if tasks else ROLES[0]
        return max(len(tasks), self.left.get(role, 0) // max(1, turns))

    def fits(self, tasks: Sequence[StageTask]) -> bool:
        need: dict[str, int] = {}
        for task in tasks:
            role = task.queue.split(".", 1)[0]
            need[role] = need.get(role, 0) + 1
        return all(self.left.get(role, 0) >= n for role, n in need.items())

    def take(self, tasks: Sequence[StageTask]) -> None:
        for task in tasks:
            role = task.queue.split(".", 1)[0]
            self.left[role] = self.left.get(role, 0) - 1


_BATCH_LANES = (Lane.BATCH, Lane.BATCH_NEW)


def feed(
    settings: Settings,
    enqueue: Enqueue,
    queue_depth: QueueDepth | None,
    capacity: Capacity | None = None,
    budget_s: float = 5.0,
) -> int:
    """One feeder pass (the reconciler's loop, the API after an upload, `tandem batch
    feed`): fail uploads that died while validating, expire batches past their completion
    window, finalize batches whose jobs are all final, then `fill`. Returns how many jobs
    were fed."""
    url = settings.database_url
    fail_stale_uploads(url)
    expire_overdue(url)
    finalize_finished(url)
    return fill(settings, enqueue, queue_depth, capacity, budget_s)


def fill(
    settings: Settings,
    enqueue: Enqueue,
    queue_depth: QueueDepth | None,
    capacity: Capacity | None = None,
    budget_s: float = 5.0,
) -> int:
    """Feed owners in turns while the batch lanes have room; returns how many jobs were
    fed. Cheap when there is nothing to feed (one query)."""
    url = settings.database_url
    with transaction(url) as session:
        owners = batch_rows.unfed_by_owner(session)
    room = Room.measure(settings, queue_depth, capacity)
    deadline = time.monotonic() + budget_s
    fed = 0
    while owners and room.total() > 0 and time.monotonic() < deadline:
        progress = 0
        at_start = Room(dict(room.left))  # each turn is a share of the room the round began with
        for owner in list(owners):
            batch_id = owners[owner][0]
            count, exhausted = feed_batch(url, batch_id, enqueue, room, len(owners), at_start)
            progress += count
            if exhausted:
                owners[owner].pop(0)
                if not owners[owner]:
                    del owners[owner]
        fed += progress
        if progress == 0:
            break
    return fed


def feed_batch(
    url: str,
    batch_id: str,
    enqueue: Enqueue,
    room: Room,
    turns: int = 1,
    round_room: Room | None = None,
) -> tuple[int, bool]:
    """Feed the batch's next jobs: one turn of `turns` (an equal share of `round_room`, the
    room when this round of turns began), as far as `room` allows. Returns how many jobs were
    fed and whether the batch has nothing left to feed (or is not in progress, or another
    feeder holds it)."""
    taken = _take(url, batch_id, room, turns, round_room or room)
    if taken is None:
        return 0, True
    tasks, fed, exhausted = taken
    if tasks:
        enqueue(tasks)
    return fed, exhausted


def _take(
    url: str, batch_id: str, room: Room, turns: int, round_room: Room
) -> tuple[list[StageTask], int, bool] | None:
    """Move the batch's feed cursor over its next jobs that fit in its share of `room`,
    granting their first steps' leases; returns their tasks (to publish after this
    commits), how many jobs were passed, and whether the batch is fully fed."""
    limit = max(1, min(FEED_CHUNK, round_room.largest() // turns))  # jobs this turn, at most
    with transaction(url) as session:
        batch = batch_rows.lock_in(session, batch_id, (BatchStatus.IN_PROGRESS,))
        if batch is None:
            return None
        jobs = batch_rows.next_unfed(session, batch, limit)
        if not jobs:
            return [], 0, True
        now = job_rows.db_now(session)
        tasks: list[StageTask] = []
        leases: list[dict] = []
        passed = 0
        share: int | None = None
        for job in jobs:
            if job.status == JobStatus.QUEUED:
                granted = _grant_first(session, job, batch_id, now)
                if granted is None:  # a poison job: failed, passed over
                    passed += 1
                    continue
                job_tasks, job_leases = granted
                share = round_room.share(job_tasks, turns) if share is None else share
                if not room.fits(job_tasks) or len(tasks) + len(job_tasks) > share:
                    break
                room.take(job_tasks)
                tasks += job_tasks
                leases.append({"job_id": job.id, "job_leases": job_leases})
            passed += 1
        if passed == 0:
            return [], 0, False
        if leases:
            # Fresh `updated_at`: time spent waiting for the feeder is not time lost on a queue.
            session.execute(
                update(job_rows.JOBS)
                .where(job_rows.JOBS.c.id == bindparam("job_id"))
                .values(leases=bindparam("job_leases"), updated_at=func.now()),
                leases,
            )
        batch.fed_through_line = jobs[passed - 1].line
        return tasks, passed, passed == len(jobs) and len(jobs) < limit


def _grant_first(
    session: Session, job: Job, batch_id: str, now: float
) -> tuple[list[StageTask], dict] | None:
    """A fed job's first tasks and its leases (JSON); None for a job that cannot be driven,
    which is failed with the reason."""
    try:
        view = unsaved(job.id, job_rows.job_request(job), batch_id, now)
        tasks = grant_next(view)
    except (PoisonJob, ValueError) as error:
        log.warning("batch job cannot be fed: %s", error, extra={"job_id": job.id})
        job_rows.mark_failed(session, job.id, f"the job cannot be started: {error}")
        return None
    return tasks, leases_to_json(view.leases)
