"""What the service needs to know of the broker besides sending messages: is it up, how
deep is each queue, and how many stages the worker pools can run at once.

Celery's Redis transport keeps each queue as a Redis list named after the queue, so a
queue's depth is one LLEN. Worker processes announce their capacity (their concurrency, per
role) in keys that expire unless refreshed, so a pool's capacity is the sum over the live
workers: the batch feeder sizes its shallow queues from it.
"""

from __future__ import annotations

import threading
import time

import redis

from services.queues import ROLES, STAGE_QUEUES, WEBHOOK_QUEUE

CAPACITY_TTL_S = 30  # a worker refreshes its key every third of this
# Every queue whose depth is reported (tandem_queue_depth, what KEDA scales on); the
# webhooks queue is kept at most 1000 deep by its dispatcher, far below any admission limit.
QUEUES = (*STAGE_QUEUES, WEBHOOK_QUEUE)


class BrokerUnavailable(RuntimeError):
    pass


class Broker:
    def __init__(self, url: str, cache_s: float = 1.0) -> None:
        self._client = redis.Redis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0, health_check_interval=10
        )
        self._cache_s = cache_s
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._depths: dict[str, int] | None = None

    def depths(self) -> dict[str, int]:
        """Messages waiting per queue (cached for `cache_s`); raises BrokerUnavailable."""
        now = time.monotonic()
        with self._lock:
            if self._depths is not None and now - self._checked_at < self._cache_s:
                return self._depths
        try:
            pipe = self._client.pipeline(transaction=False)
            for queue in QUEUES:
                pipe.llen(queue)
            depths = dict(zip(QUEUES, (int(n) for n in pipe.execute()), strict=True))
        except redis.RedisError as error:
            with self._lock:
                self._depths = None
            raise BrokerUnavailable(f"broker unreachable: {error}") from None
        with self._lock:
            self._depths, self._checked_at = depths, now
        return depths

    def depth(self, queue: str) -> int:
        """Messages waiting in one queue (from the cached `depths`)."""
        return self.depths()[queue]

    def announce_capacity(self, worker: str, role: str, slots: int) -> None:
        """This worker can run `slots` stages of `role` at once (for CAPACITY_TTL_S)."""
        self._client.set(f"tandem:capacity:{role}:{worker}", slots, ex=CAPACITY_TTL_S)

    def capacity(self) -> dict[str, int]:
        """Stages each role's live workers can run at once (0: none announced)."""
        totals = dict.fromkeys(ROLES, 0)
        try:
            for role in ROLES:
                keys = list(self._client.scan_iter(f"tandem:capacity:{role}:*", count=500))
                values = self._client.mget(keys) if keys else []
                totals[role] = sum(int(value) for value in values if value is not None)
        except redis.RedisError as error:
            raise BrokerUnavailable(f"broker unreachable: {error}") from None
        return totals

    def ping(self) -> None:
        try:
            self._client.ping()
        except redis.RedisError as error:
            raise BrokerUnavailable(f"broker unreachable: {error}") from None
