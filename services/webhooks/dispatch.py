"""The dispatcher: due deliveries (Postgres) become messages on the `webhooks` queue.

Run by the reconciler loop at every pass (`tandem reconcile`). Each due delivery no one holds
gets a new dispatch number and is held for `DISPATCH_HOLD_S` while its message waits and
runs; the queue is kept at most `MAX_QUEUED` deep, so a backlog waits in Postgres, where
its schedule is, and a Redis that loses its messages loses nothing: once the hold expires,
the delivery is dispatched again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from services.settings import Settings
from services.storage import webhook_rows
from services.storage.db import transaction

log = logging.getLogger("tandem.webhooks")

DISPATCH_HOLD_S = 300.0
PER_PASS = 500
MAX_QUEUED = 1000

Publish = Callable[[Sequence[tuple[str, int]]], None]


def dispatch(
    settings: Settings, publish: Publish, queue_depth: Callable[[], int] | None = None
) -> int:
    """One pass: returns how many deliveries were sent to the queue."""
    room = PER_PASS
    if queue_depth is not None:
        room = min(room, MAX_QUEUED - queue_depth())
    if room <= 0:
        return 0
    with transaction(settings.database_url) as session:
        claims = webhook_rows.claim_due(session, room, DISPATCH_HOLD_S)
    if not claims:
        return 0
    try:
        publish(claims)
    except Exception:
        with transaction(settings.database_url) as session:
            webhook_rows.release(session, claims)
        raise
    log.debug("dispatched %d webhook deliveries", len(claims))
    return len(claims)
