"""What the API needs to know about the broker: is it up, and how deep are the queues.

Celery's Redis transport keeps each queue as a Redis list named after the queue, so the
depth is one LLEN (the same number KEDA scales on)."""

from __future__ import annotations

import threading
import time

import redis

QUEUES = ("coordinator", "classifier", "executor")
FLAG_TTL_S = 7 * 24 * 3600  # hand-off tokens and cancel flags: longer than any job waits


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

    def take_handoff(self, token: str, job_id: str, batch_id: str | None) -> bool:
        """True for the first delivery of a handed-off stage whose job (and batch) nobody
        cancelled since; False for a redelivery or a cancelled job. Raises RedisError."""
        pipe = self._client.pipeline(transaction=False)
        pipe.set(f"tandem:handoff:{token}", 1, nx=True, ex=FLAG_TTL_S)
        pipe.exists(f"tandem:cancelled:{job_id}", f"tandem:cancelled-batch:{batch_id}")
        first, cancelled = pipe.execute()
        return bool(first) and not cancelled

    def flag_cancelled(self, job_id: str | None = None, batch_id: str | None = None) -> None:
        """Tell handed-off stages not yet started that their job (or batch) is cancelled,
        so they stop at this stage boundary instead of the next. Raises RedisError."""
        if job_id:
            self._client.set(f"tandem:cancelled:{job_id}", 1, ex=FLAG_TTL_S)
        if batch_id:
            self._client.set(f"tandem:cancelled-batch:{batch_id}", 1, ex=FLAG_TTL_S)

    def ping(self) -> None:
        try:
            self._client.ping()
        except redis.RedisError as error:
            raise BrokerUnavailable(f"broker unreachable: {error}") from None
