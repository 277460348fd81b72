"""An OpenAI-API batch's output and error files, in OpenAI's batch output format, written in
the transaction that ends the batch (services/batches/lifecycle.py).

One line per input line, in input order:

    output file   a succeeded job:
                  {"id": "batch_req_...", "custom_id": ..., "response": {"status_code": 200,
                   "request_id": <job id>, "body": <chat.completion>}, "error": null}
    error file    a failed job: response {"status_code": 500, "body": {"error": ...}};
                  an invalid line: response {"status_code": 400 or 404, "request_id":
                  null, "body": {"error": ...}} (what the request would have got alone);
                  a job cancelled by a cancel or an expiry: "response": null, "error":
                  {"code": "batch_cancelled" | "batch_expired", "message": ...}

Written once, when the batch is final, so the files survive the jobs (retention may delete
jobs later) and have a true size. The jobs are read 1,000 at a time and the bytes go out a
chunk at a time (services/files/store.py), so memory does not grow with the batch. A file
with no line is not created (its id stays null).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy.orm import Session

from services.api.openai import mapping
from services.core.params import JobParams
from services.files import store
from services.storage import costs, file_rows
from services.storage.costs import StageSums
from services.storage.models import Batch
from services.storage.statuses import BatchStatus, JobStatus

PAGE = 1000
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was cancelled before it ran to the end (the batch was cancelled)."


class _LazyFile:
    """A file that is created at its first line."""

    def __init__(self, session: Session, batch: Batch, kind: str) -> None:
        self.session, self.batch, self.kind = session, batch, kind
        self.writer: store.FileWriter | None = None

    def write(self, line: dict[str, Any]) -> None:
        if self.writer is None:
            name = f"{self.batch.id}_{self.kind}.jsonl"
            self.writer = store.create(
                self.session, self.batch.owner, "batch_output", name, batch_id=self.batch.id
            )
        self.writer.write(mapping.dumps(line))

    def close(self) -> str | None:
        return self.writer.close().id if self.writer else None


def write_batch_files(session: Session, batch: Batch) -> None:
    """Write the batch's output and error files and set their ids on the batch."""
    output = _LazyFile(session, batch, "output")
    errors = _LazyFile(session, batch, "error")
    for kind, line in lines(session, batch):
        (output if kind == "output" else errors).write(line)
    batch.output_file_id = output.close()
    batch.error_file_id = errors.close()


def lines(session: Session, batch: Batch) -> Iterator[tuple[str, dict[str, Any]]]:
    """("output" | "error", line) for every non-blank input line, in input order."""
    invalid = iter(sorted(batch.errors or [], key=lambda e: e["line"]))
    pending = next(invalid, None)
    last = 0
    while True:
        rows = file_rows.output_page(session, batch.id, last, PAGE)
        ids = [row.id for row in rows]
        sums = costs.by_job(session, ids)
        finish = file_rows.last_finish_reasons(session, ids)
        for row in rows:
            while pending is not None and pending["line"] < row.line:
                yield "error", _invalid_line(batch.id, pending)
                pending = next(invalid, None)
            yield _job_line(batch, row, sums.get(row.id, StageSums()), finish.get(row.id))
        if len(rows) < PAGE:
            break
        last = rows[-1].line
    while pending is not None:
        yield "error", _invalid_line(batch.id, pending)
        pending = next(invalid, None)


def _job_line(batch: Batch, row: Any, sums: StageSums, finish: str | None) -> tuple[str, dict]:
    line_id = "batch_req_" + row.id.removeprefix("job_")
    if row.status == JobStatus.SUCCEEDED:
        try:
            params = JobParams.model_validate(row.params or {})
        except ValueError:  # a row edited by hand: the defaults still give a readable line
            params = JobParams()
        job = mapping.FinishedJob(
            job_id=row.id,
            strategy=row.strategy,
            params=params,
            created_at=row.created_at,
            answer=row.answer,
            final_text=row.final_text,
            sums=sums,
            finish_reason=finish,
        )
        body = mapping.completion(job, f"/v1/jobs/{row.id}").model_dump(mode="json")
        response = {"status_code": 200, "request_id": row.id, "body": body}
        return "output", {"id": line_id, "custom_id": row.custom_id, "response": response, "error": None}
    if row.status == JobStatus.FAILED:
        body = mapping.error_body(f"the job failed: {row.error}", None, "job_failed", 500)
        response = {"status_code": 500, "request_id": row.id, "body": body}
        return "error", {"id": line_id, "custom_id": row.custom_id, "response": response, "error": None}
    expired = batch.status == BatchStatus.EXPIRED
    error = {
        "code": "batch_expired" if expired else "batch_cancelled",
        "message": EXPIRED_MESSAGE if expired else CANCELLED_MESSAGE,
    }
    return "error", {"id": line_id, "custom_id": row.custom_id, "response": None, "error": error}


def _invalid_line(batch_id: str, error: dict[str, Any]) -> dict[str, Any]:
    status = mapping.line_status(error.get("code"))
    body = mapping.error_body(error["error"], error.get("param"), error.get("code"), status)
    return {
        "id": f"batch_req_{batch_id.removeprefix('batch_')}_line{error['line']}",
        "custom_id": error.get("custom_id"),
        "response": {"status_code": status, "request_id": None, "body": body},
        "error": None,
    }
