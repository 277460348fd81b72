"""Queue names, defined once.

Each role's model pool (coordinator, classifier, executor) consumes three Redis lists, in
this order of priority (strictly: a worker takes from a later list only when the earlier
ones are empty):

    <role>             interactive: stages of single jobs (and OpenAI chat requests)
    <role>.batch       the next stages of batch jobs already started (finish what is started)
    <role>.batch-new   the first stage of batch jobs not started yet

Celery's Redis transport keeps each queue as a Redis list of that name, so its depth is one
LLEN. A worker for a role runs `celery -A workers worker -Q <role>,<role>.batch,<role>.batch-new`
(kombu's `queue_order_strategy: priority` keeps that order; see workers/app.py).

Webhook deliveries have a queue of their own, `webhooks`, and a worker of their own; it is
not a stage queue (no role, no lanes).
"""

from __future__ import annotations

from enum import StrEnum

ROLES = ("coordinator", "classifier", "executor")


class Lane(StrEnum):
    INTERACTIVE = "interactive"
    BATCH = "batch"
    BATCH_NEW = "batch-new"


def queue_name(role: str, lane: Lane = Lane.INTERACTIVE) -> str:
    return role if lane is Lane.INTERACTIVE else f"{role}.{lane}"


def lane_of(batch_id: str | None, first_step: bool) -> Lane:
    """The lane of a job's next stage: single jobs are interactive; a batch job's first
    stage waits behind the next stages of batch jobs already started."""
    if batch_id is None:
        return Lane.INTERACTIVE
    return Lane.BATCH_NEW if first_step else Lane.BATCH


def lane_of_queue(queue: str) -> Lane:
    """The lane a stage queue serves (its name's suffix; a role alone is interactive)."""
    _, _, suffix = queue.partition(".")
    return Lane(suffix) if suffix else Lane.INTERACTIVE


def role_queues(role: str) -> tuple[str, ...]:
    """A role's queues, highest priority first (what its worker consumes, in this order)."""
    return tuple(queue_name(role, lane) for lane in Lane)


STAGE_QUEUES = tuple(queue for role in ROLES for queue in role_queues(role))

WEBHOOK_QUEUE = "webhooks"
