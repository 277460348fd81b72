"""Reading a batch: its progress (counts, cost so far, ETA) and its results, one per input
line, in input order, while it runs and after."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from services.storage import batch_rows, costs, job_rows
from services.storage.costs import StageSums
from services.storage.db import transaction
from services.storage.models import Batch, Job, utcnow
from services.storage.statuses import FINAL_BATCH_STATUSES, BatchStatus


@dataclass
class Progress:
    counts: dict[str, int]  # jobs by status, plus "invalid" lines
    cost: dict[str, float | int]
    eta_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "cost": self.cost, "eta_s": self.eta_s}


def progress(session: Session, batch: Batch) -> Progress:
    """Counts, cost and ETA; frozen at finalization, computed from the jobs until then."""
    final = (batch.metadata_ or {}).get("final")
    if batch.status in FINAL_BATCH_STATUSES and final:
        return Progress(final["counts"], final["cost"], None)
    counts = job_rows.status_counts(session, Job.batch_id == batch.id)
    counts["invalid"] = batch.invalid_lines
    cost = costs.over_jobs(session, Job.batch_id == batch.id).to_dict()
    return Progress(counts, cost, _eta(batch, counts))


def _eta(batch: Batch, counts: dict[str, int]) -> float | None:
    done = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    left = counts["queued"] + counts["running"]
    running = batch.status == BatchStatus.IN_PROGRESS
    if not running or not batch.started_at or done == 0 or left == 0:
        return 0.0 if left == 0 and running else None
    elapsed = (utcnow() - batch.started_at).total_seconds()
    return round(elapsed / done * left, 1)


def results(url: str, batch_id: str, errors: Sequence[dict[str, Any]]) -> Iterator[dict]:
    """One result per non-blank input line, in line order: the batch's jobs (with their
    current status, so it works while the batch runs) merged with its invalid lines. Reads
    the jobs in keyset pages, each in its own short transaction."""
    invalid = iter(sorted(errors, key=lambda e: e["line"]))
    pending = next(invalid, None)
    last = 0
    while True:
        with transaction(url) as session:
            rows = batch_rows.result_page(session, batch_id, last)
            sums = costs.by_job(session, [row.id for row in rows])
        for row in rows:
            while pending is not None and pending["line"] < row.line:
                yield _invalid_result(pending)
                pending = next(invalid, None)
            yield _job_result(row, sums.get(row.id, StageSums()))
        if len(rows) < batch_rows.CHUNK:
            break
        last = rows[-1].line
    while pending is not None:
        yield _invalid_result(pending)
        pending = next(invalid, None)


def _job_result(row: Any, cost: StageSums) -> dict[str, Any]:
    return {
        "custom_id": row.custom_id,
        "line": row.line,
        "job_id": row.id,
        "status": row.status,
        "answer": row.answer,
        "cost": cost.to_dict(),
        "error": row.error,
    }


def _invalid_result(error: dict[str, Any]) -> dict[str, Any]:
    return {
        "custom_id": error.get("custom_id"),
        "line": error["line"],
        "job_id": None,
        "status": "invalid",
        "answer": None,
        "cost": None,
        "error": error["error"],
    }
