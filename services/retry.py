"""Retrying idempotent HTTP calls across transport errors (a dropped keep-alive connection,
a read timeout while the server restarts): a poll must not end a long run on one blip."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def retry_transport(call: Callable[[], T], attempts: int = 5, first_pause_s: float = 0.5) -> T:
    """`call()`, again after a growing pause on an httpx transport error; the last error
    propagates. Only for requests that are safe to repeat (GET, or POST with an
    Idempotency-Key)."""
    import httpx

    pause = first_pause_s
    for attempt in range(attempts):
        try:
            return call()
        except httpx.TransportError:
            if attempt == attempts - 1:
                raise
            time.sleep(pause)
            pause *= 2
    raise AssertionError("unreachable")
