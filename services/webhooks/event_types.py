"""The webhook event types and their stored bits: a leaf module (no imports of ours), so
storage and the webhooks package can both name them."""

from __future__ import annotations

from enum import StrEnum


class EventType(StrEnum):
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"
    BATCH_COMPLETED = "batch.completed"
    BATCH_FAILED = "batch.failed"
    BATCH_CANCELLED = "batch.cancelled"
    BATCH_EXPIRED = "batch.expired"


# Each type's bit in webhook_endpoints.event_mask. Stored: never renumber, only add.
BITS: dict[EventType, int] = {event: 1 << index for index, event in enumerate(EventType)}
# The job event for each final job status (job_rows' mark_* functions).
JOB_EVENTS = {
    "succeeded": EventType.JOB_SUCCEEDED,
    "failed": EventType.JOB_FAILED,
    "cancelled": EventType.JOB_CANCELLED,
}


__all__ = ["BITS", "JOB_EVENTS", "EventType"]
