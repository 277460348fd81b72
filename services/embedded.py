"""Embedded mode's record keeping: a job run in-process is stored like a service job
(same tables, SQLite by default), so `tandem run` leaves the same trail as the API."""

from __future__ import annotations

from services.core.requests import JobRequest
from services.core.steps import Outcome, StageRecord
from services.storage import job_rows, stage_rows
from services.storage.db import transaction, upgrade
from services.storage.models import utcnow
from services.storage.statuses import JobStatus

EMBEDDED_OWNER = "local"
_upgraded: set[str] = set()


def ensure_schema(url: str) -> None:
    if url not in _upgraded:
        upgrade(url)
        _upgraded.add(url)


class Recorder:
    def __init__(self, url: str, request: JobRequest, owner: str = EMBEDDED_OWNER) -> None:
        ensure_schema(url)
        self.url = url
        with transaction(url) as session:
            job = job_rows.new_job(owner, request, status=JobStatus.RUNNING)
            job.started_at = utcnow()
            session.add(job)
            session.flush()
            self.job_id = job.id

    def stage(self, record: StageRecord) -> None:
        with transaction(self.url) as session:
            stage_rows.add_stage(session, self.job_id, record)

    def succeeded(self, outcome: Outcome) -> None:
        with transaction(self.url) as session:
            job_rows.mark_succeeded(session, self.job_id, outcome)

    def failed(self, error: str) -> None:
        with transaction(self.url) as session:
            job_rows.mark_failed(session, self.job_id, error)
