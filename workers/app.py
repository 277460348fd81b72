"""The Celery app and the settings that give at-least-once delivery with exactly-once effect."""

from __future__ import annotations

import logging
import os
import sys

from celery import Celery, signals
from kombu import Queue

from services.settings import get_settings

QUEUES = ("coordinator", "classifier", "executor")


def make_app() -> Celery:
    settings = get_settings()
    app = Celery("tandem", broker=settings.redis_url, include=["workers.tasks"])
    app.conf.update(
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="executor",
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A message is acked only after its stage committed; a worker that dies mid-stage
        # leaves it to be redelivered. Stage writes are idempotent, so redelivery is safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One reserved message per execution slot: a slow model must not hoard messages.
        worker_prefetch_multiplier=1,
        # Redis redelivers an unacked message after this long: above the longest stage. A
        # dead worker's stage is picked up sooner by the reconciler (heartbeats stop).
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
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

    from services.core.backends.template_source import check_served_templates
    from services.core.classifier import check_classifier_artifact
    from services.core.engines import ConfigurationError
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
