"""Admission control: accept new work only when it can be queued and the queues have room."""

from __future__ import annotations

import logging

import redis
from flask import current_app

from services.api.problems import Problem
from services.broker import Broker, BrokerUnavailable

log = logging.getLogger("tandem.api")


class Admission:
    def __init__(self, broker: Broker, max_queue_depth: int) -> None:
        self.broker = broker
        self.max_queue_depth = max_queue_depth

    def check(self, owner: str, new_jobs: int = 1) -> None:
        """Raise 503 when the broker is down, 429 when the queues are over their depth."""
        try:
            depths = self.broker.depths()
        except BrokerUnavailable:
            raise Problem(
                503,
                "the job queue is unavailable; nothing was accepted, retry shortly",
                headers={"Retry-After": "5"},
            ) from None
        deepest = max(depths.values(), default=0)
        if deepest + new_jobs > self.max_queue_depth:
            raise Problem(
                429,
                f"the queues are full ({deepest} waiting, limit {self.max_queue_depth}); "
                "retry later",
                headers={"Retry-After": "10"},
            )


def flag_cancelled(job_id: str | None = None, batch_id: str | None = None) -> None:
    """After a cancel committed: let handed-off stages not yet started see it. Best effort:
    without the flag such a stage runs, and the job stops at the boundary after it."""
    try:
        current_app.extensions["tandem.admission"].broker.flag_cancelled(job_id, batch_id)
    except redis.RedisError as error:
        log.warning("cancel flag not set (%s): %s", job_id or batch_id, error)
