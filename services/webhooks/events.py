"""Event types, what an event's payload says, and the emit call for batch changes.

An event is written in the transaction of the status change it reports (the outbox), and
only when one of its owner's endpoints subscribes to its type: an owner without endpoints
costs one indexed lookup and writes nothing, an event never outlives a rolled-back change,
and none is written for a change that did not happen. Job events come from
`services.storage.job_rows` (right after the UPDATE that ends a job, only when it changed
the job); batch events from `emit_batch`, called where a batch reaches its final status.

Jobs of a batch send no job events (a million-line batch would send a million): the batch's
own event says when its results are ready.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from services.webhooks.event_types import BITS, EventType


def mask_of(events: list[EventType]) -> int:
    mask = 0
    for event in events:
        mask |= BITS[event]
    return mask


def events_of(mask: int) -> list[str]:
    return [str(event) for event, bit in BITS.items() if mask & bit]


def payload(
    event_type: str, object_id: str, created_at: datetime, public_url: str | None = None
) -> dict[str, Any]:
    """The body of an event: small, never the results (the receiver fetches them at `url`,
    with its API key)."""
    kind, _, status = event_type.partition(".")
    path = f"/v1/{kind}es/{object_id}" if kind == "batch" else f"/v1/{kind}s/{object_id}"
    return {
        "type": event_type,
        "timestamp": _iso(created_at),
        "data": {
            "object": kind,
            "id": object_id,
            "status": status,
            "url": (public_url.rstrip("/") + path) if public_url else path,
        },
    }


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:  # SQLite hands back naive UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def emit_batch(session: Session, batch: Any, event_type: str) -> bool:
    """Write a batch's event in the caller's transaction (call it where the batch's new
    status is set, e.g. `emit_batch(session, batch, "batch.expired")`). Returns whether any
    endpoint subscribes (False: nothing was written)."""
    from services.storage import webhook_rows

    return webhook_rows.emit(session, batch.owner, EventType(event_type), batch.id)
