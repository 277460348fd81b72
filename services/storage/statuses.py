"""Status names of jobs and batches, in one place.

A job moves `queued -> running -> succeeded | failed | cancelled`; a batch follows the
OpenAI Batch API's life (`validating -> in_progress -> finalizing -> completed`, with
`failed`, `cancelling`, `cancelled`, and `expired` once an OpenAI-API batch's completion
window passed). The members are strings, so they compare equal to the values stored in
Postgres and can be passed to SQL as they are.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # an OpenAI-API batch whose completion window passed (what finished is kept)


# A job that still has work ahead of it, and one that never changes again.
ACTIVE_JOB_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
FINAL_JOB_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
# A batch whose jobs may still run (and which the feeder and finalizer look at), and one
# whose results are frozen.
ACTIVE_BATCH_STATUSES = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING, BatchStatus.FINALIZING)
FINAL_BATCH_STATUSES = (
    BatchStatus.COMPLETED,
    BatchStatus.FAILED,
    BatchStatus.CANCELLED,
    BatchStatus.EXPIRED,
)
