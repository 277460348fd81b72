"""Admission control: accept new work only when it can be queued and the queues have room."""

from __future__ import annotations

import logging

from services.api.problems import Problem
from services.broker import Broker, BrokerUnavailable
from services.queues import STAGE_QUEUES

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
        deepest = max((depths[queue] for queue in STAGE_QUEUES if queue in depths), default=0)
        if deepest + new_jobs > self.max_queue_depth:
            raise Problem(
                429,
                f"the queues are full ({deepest} waiting, limit {self.max_queue_depth}); "
                "retry later",
                headers={"Retry-After": "10"},
            )
