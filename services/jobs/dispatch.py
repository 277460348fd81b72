"""The one way a job's next stages reach a queue: grant each a lease and build its message.

Whoever changes a job so that it waits for new steps (submit, a recorded stage, the batch
feeder, the reconciler) calls `grant_next` in the same transaction. A step that already has
a lease keeps it: its message is out (or its holder runs it), so a parallel group is sent
once, by whichever transaction first finds it wanted.
"""

from __future__ import annotations

from services.core.steps import Step
from services.jobs.leases import Lease, granted
from services.jobs.messages import Grant, StageTask
from services.jobs.view import JobView
from services.queues import lane_of, queue_name


def grant_next(view: JobView) -> list[StageTask]:
    """Lease the steps the job waits for that have no lease yet (in `view.leases`, for the
    caller to write) and return their messages, to publish once that write is certain.
    Raises PoisonJob for a job that cannot be driven."""
    tasks = []
    for seq, step in view.wanted().items():
        if seq not in view.leases:
            view.leases[seq] = granted(view.now)
            tasks.append(task_for(view, seq, step, view.leases[seq]))
    return tasks


def task_for(view: JobView, seq: int, step: Step, lease: Lease) -> StageTask:
    """The message that lets a worker start step `seq` under `lease`."""
    lane = lane_of(view.batch_id, first_step=not view.records)
    return StageTask(view.id, seq, queue_name(step.role, lane), Grant(lease.token, step))
