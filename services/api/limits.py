"""Per-key limits: a request rate (fixed one-minute windows counted in Redis, shared by every
API process) and a quota of unfinished jobs per owner (counted in Postgres)."""

from __future__ import annotations

import time

import redis
from sqlalchemy.orm import Session

from services.api.problems import Problem
from services.storage import job_rows

WINDOW_S = 60


class RateLimiter:
    def __init__(self, url: str, per_minute: int) -> None:
        self.per_minute = per_minute
        self._client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)

    def hit(self, owner: str) -> None:
        """Count a request; 429 once the owner is over its rate this minute. Fails open when
        Redis is down (submission then answers 503 on its own)."""
        if self.per_minute <= 0:
            return
        window = int(time.time() // WINDOW_S)
        key = f"tandem:rate:{owner}:{window}"
        try:
            pipe = self._client.pipeline()
            pipe.incr(key)
            pipe.expire(key, WINDOW_S * 2)
            count = int(pipe.execute()[0])
        except redis.RedisError:
            return
        if count > self.per_minute:
            retry_after = WINDOW_S - int(time.time()) % WINDOW_S
            raise Problem(
                429,
                f"rate limit: {self.per_minute} requests per minute per key; slow down",
                headers={"Retry-After": str(max(1, retry_after))},
            )


def check_active_quota(session: Session, owner: str, quota: int, adding: int = 1) -> None:
    """429 when the owner already has `quota` unfinished jobs (scan bounded by the quota)."""
    if quota <= 0:
        return
    active = job_rows.count_active(session, owner, quota + 1)
    if active + adding > quota:
        raise Problem(
            429,
            f"quota: at most {quota} unfinished jobs per key ({active} now); "
            "wait for some to finish",
            headers={"Retry-After": "30"},
        )
