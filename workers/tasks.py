"""Stage tasks. One task runs one step of one job; the queue it arrives on names the
model pool (coordinator, classifier, executor)."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from contextlib import nullcontext

from celery.utils.nodenames import anon_nodename
from kombu.utils.uuid import uuid

from services.broker import Broker
from services.core.backends.base import TransientBackendError
from services.core.engines import Engines
from services.jobs import Task, note_error, run_stage
from services.observability import RETRIES
from services.settings import get_settings
from workers.app import app

log = logging.getLogger("tandem.worker")
_engines: Engines | None = None
BATCH_FROM = 8  # more tasks than this are published in pipelined batches
_broker: Broker | None = None
_engines_lock = threading.Lock()


def engines() -> Engines:
    """The models this worker process holds, loaded on first use and shared by its threads."""
    global _engines
    with _engines_lock:
        if _engines is None:
            _engines = Engines(get_settings())
        return _engines


def broker() -> Broker:
    """This worker process's Redis client for hand-off tokens and cancel flags."""
    global _broker
    with _engines_lock:
        if _broker is None:
            _broker = Broker(get_settings().redis_url)
        return _broker


@app.task(name="tandem.stage", bind=True, max_retries=None)
def stage(self, job_id: str, seq: int, handoff: dict | None = None) -> None:
    settings = get_settings()
    try:
        tasks = run_stage(settings, engines(), job_id, seq, handoff, broker(), enqueue)
    except TransientBackendError as error:
        retry_later(self, job_id, seq, str(error))
    except Exception as error:  # a bug or a crash in the engine: retried, then capped
        log.exception("stage failed", extra={"job_id": job_id, "seq": seq})
        retry_later(self, job_id, seq, f"{type(error).__name__}: {error}")
    enqueue(tasks)


def retry_later(task, job_id: str, seq: int, error: str) -> None:
    """Keep the error on the job and redeliver after a backoff; the attempt cap in
    services.jobs ends a job whose stage keeps failing."""
    note_error(get_settings().database_url, job_id, error)
    RETRIES.labels((task.request.delivery_info or {}).get("routing_key", "?")).inc()
    raise task.retry(countdown=backoff(task.request.retries)) from None


def backoff(retries: int) -> float:
    return min(60.0, 0.5 * 2**retries) * (0.5 + random.random())


def enqueue(tasks: Sequence[Task]) -> None:
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
                task_id = uuid()
                message = app.amqp.as_task_v2(
                    task_id,
                    stage.name,
                    args=(task.job_id, task.seq),
                    kwargs={"handoff": task.handoff} if task.handoff else {},
                    origin=origin,
                    ignore_result=True,
                    # What `celery inspect` shows; the default repr of a hand-off (a whole
                    # prompt) would cost more than the rest of the message.
                    argsrepr=repr((task.job_id, task.seq)),
                    kwargsrepr="{'handoff': ...}" if task.handoff else "{}",
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
