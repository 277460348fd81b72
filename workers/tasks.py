"""Stage tasks. One task runs one step of one job; the queue it arrives on names the
model pool (coordinator, classifier, executor) and the lane. The work is
`services.jobs.run_stage`; this module wires it to Celery: the process's engines and
heartbeat, publishing the next stages, and retries with backoff."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from celery.utils.nodenames import anon_nodename
from kombu.utils.uuid import uuid

from services.core.backends.base import Priority
from services.core.engines import Engines
from services.jobs import Grant, RetryStage, StageContext, StageTask, run_stage
from services.jobs.heartbeat import Heartbeat
from services.observability import IN_FLIGHT, RETRIES
from services.queues import STAGE_QUEUES, Lane, lane_of_queue
from services.settings import get_settings
from workers.app import app

log = logging.getLogger("tandem.worker")
BATCH_FROM = 8  # more tasks than this are published in pipelined batches
_context: StageContext | None = None
_context_lock = threading.Lock()


def context() -> StageContext:
    """What this worker process holds for its stages (models loaded on first use, shared by
    its threads; one heartbeat thread)."""
    global _context
    with _context_lock:
        if _context is None:
            settings = get_settings()
            heartbeat = Heartbeat(
                settings.database_url, settings.stage_deadline_s, settings.stage_timeout_s
            )
            _context = StageContext(settings, Engines(settings), heartbeat, enqueue)
        return _context


@app.task(name="tandem.stage", bind=True, max_retries=None)
def stage(self, job_id: str, seq: int, grant: dict[str, Any] | None = None, **_old: Any) -> None:
    """Run step `seq` of a job. `_old` swallows the keyword arguments of messages sent by an
    earlier version (a `handoff`): such a message starts its stage as an ungranted one."""
    queue = (self.request.delivery_info or {}).get("routing_key", "?")
    try:
        parsed = Grant.from_json(grant) if grant else None
    except (KeyError, TypeError, ValueError) as error:
        log.error("malformed grant dropped: %s", error, extra={"job_id": job_id, "seq": seq})
        return
    IN_FLIGHT.labels(queue).inc()
    try:
        left = run_stage(context(), job_id, seq, parsed, engine_priority(queue))
    except RetryStage as failed:
        RETRIES.labels(queue).inc()
        raise self.retry(
            kwargs={"grant": failed.grant.to_json()}, countdown=backoff(self.request.retries)
        ) from None
    except Exception as error:  # Postgres or Redis away before the stage held its lease
        log.warning("stage not started: %s", error, extra={"job_id": job_id, "seq": seq})
        RETRIES.labels(queue).inc()
        kwargs = {"grant": grant} if grant else {}
        raise self.retry(kwargs=kwargs, countdown=backoff(self.request.retries)) from None
    finally:
        IN_FLIGHT.labels(queue).dec()
    enqueue(left)


def engine_priority(queue: str) -> Priority:
    """A stage from the interactive lane runs before batch stages on a shared engine."""
    if queue in STAGE_QUEUES and lane_of_queue(queue) is not Lane.INTERACTIVE:
        return Priority.BATCH
    return Priority.INTERACTIVE


def backoff(retries: int) -> float:
    return min(60.0, 0.5 * 2**retries) * (0.5 + random.random())


def enqueue(tasks: Sequence[StageTask]) -> None:
    """Put stage tasks on their queues: the same messages `stage.apply_async` sends (built
    by Celery's own protocol-2 builder), published in pipelined round trips, several times
    faster than one apply_async per task for a batch's thousands."""
    if not tasks:
        return
    origin = anon_nodename()
    with app.producer_or_acquire() as producer:
        # kombu >= 5.7 pipelines publishes: worth it for a batch's thousands, but its flush
        # costs about a millisecond more than one plain publish, so a hop's few go direct.
        batch = getattr(producer, "batch", None) if len(tasks) > BATCH_FROM else None
        with batch(max_size=500) if batch else nullcontext():
            for task in tasks:
                grant = {"grant": task.grant.to_json()} if task.grant else {}
                message = app.amqp.as_task_v2(
                    uuid(),
                    stage.name,
                    args=(task.job_id, task.seq),
                    kwargs=grant,
                    origin=origin,
                    ignore_result=True,
                    # What `celery inspect` shows; the default repr of a grant (a whole
                    # prompt) would cost more than the rest of the message.
                    argsrepr=repr((task.job_id, task.seq)),
                    kwargsrepr="{'grant': ...}" if grant else "{}",
                )
                producer.publish(
                    message.body,
                    exchange="",
                    routing_key=task.queue,
                    serializer="json",
                    headers=message.headers,
                    delivery_mode=2,
                    retry=False,
                    **message.properties,
                )
