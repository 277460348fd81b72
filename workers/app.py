"""The Celery app and the settings that give at-least-once delivery with exactly-once effect."""

from __future__ import annotations

import logging
import os
import sys
import time

from celery import Celery, signals
from kombu import Queue

from services.queues import STAGE_QUEUES, WEBHOOK_QUEUE
from services.settings import get_settings


def make_app() -> Celery:
    settings = get_settings()
    app = Celery("tandem", broker=settings.redis_url, include=["workers.tasks", "workers.webhooks"])
    app.conf.update(
        # kombu's Redis transport, but a failed ack does not hold a prefetch slot forever
        # (for redis:// and rediss:// URLs; others keep their own transport)
        broker_transport=(
            "workers.transport:Transport"
            if settings.redis_url.startswith(("redis://", "rediss://"))
            else None
        ),
        task_queues=[Queue(name) for name in (*STAGE_QUEUES, WEBHOOK_QUEUE)],
        task_default_queue="executor",
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A message is acked only after its stage committed; a worker that dies mid-stage
        # leaves it to be redelivered. Leases make a redelivery start the stage at most once.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One reserved message per execution slot: a slow model must not hoard messages,
        # and a worker picks its next message by lane priority when a slot frees up.
        worker_prefetch_multiplier=1,
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        broker_transport_options={
            # Redis redelivers an unacked message after this long: above the longest stage
            # (TANDEM_STAGE_TIMEOUT_S). A dead worker's stage is re-granted sooner by the
            # reconciler (its heartbeats stop).
            "visibility_timeout": settings.visibility_timeout_s,
            # A worker's -Q lists a role's lanes highest first; take from a lane only when
            # the ones before it are empty (services/queues.py).
            "queue_order_strategy": "priority",
            "socket_timeout": 5,
            "socket_connect_timeout": 3,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


app = make_app()


@signals.worker_init.connect
def _worker_started(sender=None, **_kwargs) -> None:
    """JSON logs, this worker's /metrics on TANDEM_METRICS_PORT (0: none), and a check of
    the classifier artifact and of its served models' chat templates: a missing or
    incompatible one stops the worker now, with one line saying why, instead of failing
    every job later."""
    from prometheus_client import start_http_server

    from services.core.backends.base import ConfigurationError
    from services.core.classifier import check_classifier_artifact
    from services.core.engines import check_served_templates
    from services.observability import setup_logging

    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    try:
        check_classifier_artifact(settings)
        for line in check_served_templates(settings, sender.app.amqp.queues.consume_from):
            logging.getLogger("tandem.worker").info(line)
    except ConfigurationError as error:
        sys.stderr.write(f"tandem worker: {error}\n")
        sys.stderr.flush()
        os._exit(78)  # EX_CONFIG; a signal handler cannot stop Celery's start otherwise
    if settings.metrics_port:
        start_http_server(settings.metrics_port)


@signals.worker_ready.connect
def _announce_capacity(sender=None, **_kwargs) -> None:
    """Tell the batch feeder how many stages of each role this worker runs at once, for as
    long as it lives (a key that expires unless refreshed). `sender` is the consumer."""
    import contextlib
    import threading

    from services.broker import CAPACITY_TTL_S, Broker
    from services.queues import ROLES

    consumed = sender.app.amqp.queues.consume_from or {}
    roles = sorted({name.split(".", 1)[0] for name in consumed} & set(ROLES))
    slots = getattr(getattr(sender, "controller", None), "concurrency", None)
    slots = int(slots or get_settings().worker_concurrency)
    worker = str(getattr(sender, "hostname", None) or f"worker-{os.getpid()}")
    broker = Broker(get_settings().redis_url)

    def announce() -> None:
        while True:
            for role in roles:
                with contextlib.suppress(Exception):  # Redis away: the feeder's minimum depth
                    broker.announce_capacity(worker, role, slots)
            time.sleep(CAPACITY_TTL_S / 3)

    threading.Thread(target=announce, name="announce-capacity", daemon=True).start()
