"""The webhook task: one attempt of one delivery (services.webhooks.delivery), on the
`webhooks` queue, consumed by a worker of its own (`celery -A workers worker -Q webhooks`).
The schedule, retries included, is kept in Postgres; the task itself never retries: a
failed attempt is due again at the time it recorded, and the dispatcher sends it then."""

from __future__ import annotations

from collections.abc import Sequence

from services.observability import IN_FLIGHT
from services.queues import WEBHOOK_QUEUE
from services.settings import get_settings
from workers.app import app


@app.task(name="tandem.webhook")
def deliver(delivery_id: str, dispatch: int) -> None:
    from services.webhooks.delivery import attempt

    IN_FLIGHT.labels(WEBHOOK_QUEUE).inc()
    try:
        attempt(get_settings(), delivery_id, dispatch)
    finally:
        IN_FLIGHT.labels(WEBHOOK_QUEUE).dec()


def publish(claims: Sequence[tuple[str, int]]) -> None:
    """One message per (delivery, dispatch) on the webhooks queue."""
    with app.producer_or_acquire() as producer:
        for delivery_id, dispatch in claims:
            deliver.apply_async(
                (delivery_id, dispatch), queue=WEBHOOK_QUEUE, producer=producer, retry=False
            )


def queue_depth() -> int:
    """Messages waiting on the webhooks queue (a Redis list, like every Celery queue here)."""
    with app.connection_for_write() as connection:
        client = connection.default_channel.client
        return int(client.llen(WEBHOOK_QUEUE))
