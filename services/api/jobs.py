"""/v1/jobs: submit, read, list, cancel, delete."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from services import jobs as job_service
from services.api import pages
from services.api.auth import authenticate
from services.api.docs import ERRORS, add_paths
from services.api.formats import iso
from services.api.limits import check_active_quota
from services.api.problems import Problem
from services.core.cost import totals
from services.core.requests import (
    InvalidJSON,
    InvalidRequest,
    parse_job_request,
    read_json,
    unstorable,
)
from services.storage import job_rows, stage_rows
from services.storage.db import in_transaction, transaction
from services.storage.models import Job
from services.storage.statuses import JobStatus

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
log = logging.getLogger("tandem.api.jobs")

MAX_IDEMPOTENCY_KEY = 200


def settings():
    return current_app.config["TANDEM"]


def json_body() -> Any:
    """The request's JSON body, read like every client JSON (`read_json`): 400 when it is
    not JSON; what it holds is validated by the caller (422 naming the field)."""
    if not request.is_json:
        raise Problem(415, "send a JSON body with 'Content-Type: application/json'")
    try:
        return read_json(request.get_data(cache=False) or b"")
    except InvalidJSON as error:
        raise Problem(400, f"malformed JSON: {error}") from None


def job_json(job: Job, with_stages: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job.id,
        "object": "job",
        "status": job.status,
        "strategy": job.strategy,
        "question": job.question,
        "params": job.params,
        "answer": job.answer,
        "final_text": job.final_text,
        "summary": job.summary,
        "error": job.error,
        "batch_id": job.batch_id,
        "custom_id": job.custom_id,
        "cancel_requested": job.cancel_requested,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "status_url": url_for("jobs.get_job", job_id=job.id, _external=False),
    }
    if with_stages:
        records = [stage_rows.to_record(stage) for stage in job.stages]
        body["stages"] = [
            {**record.to_dict(), "created_at": iso(stage.created_at)}
            for record, stage in zip(records, job.stages, strict=True)
        ]
        body["cost"] = totals(records).to_dict()
        body["timings"] = _timings(job)
    return body


def _timings(job: Job) -> dict[str, float | None]:
    def span(start: datetime | None, end: datetime | None) -> float | None:
        return round((end - start).total_seconds(), 3) if start and end else None

    return {
        "queued_s": span(job.created_at, job.started_at),
        "running_s": span(job.started_at, job.finished_at),
        "total_s": span(job.created_at, job.finished_at),
    }


def owned_job(session: Session, job_id: str, owner: str, with_stages: bool = True) -> Job:
    """The owner's job, or 404 (another owner's job is indistinguishable from a missing one)."""
    job = job_rows.owned(session, job_id, owner, with_stages)
    if job is None:
        raise Problem(404, f"no job {job_id[: job_rows.ID_MAX]!r}")
    return job


def idempotency_key() -> str | None:
    """The request's Idempotency-Key header, if any: the same key from the same owner gets
    what its first request created."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise Problem(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    if key is not None and (problem := unstorable(key)):
        raise Problem(422, f"Idempotency-Key: {problem}")
    return key


@bp.post("")
def create_job() -> tuple[Response, int, dict[str, str]]:
    owner = authenticate()
    key = idempotency_key()
    try:
        job_request = parse_job_request(json_body(), settings().max_question_chars)
    except InvalidRequest as error:
        raise Problem(422, str(error)) from None
    admission = current_app.extensions["tandem.admission"]
    admission.check(owner)
    with transaction(settings().database_url) as session:
        check_active_quota(session, owner, settings().max_active_jobs)
        job, tasks, created = job_service.submit(session, owner, job_request, key)
        body = job_json(job, with_stages=False)
    try:
        current_app.extensions["tandem.enqueue"](tasks)
    except Exception as error:  # the broker went away after admission; the job is committed
        log.warning("job %s accepted, enqueue failed (the reconciler will): %s", job.id, error)
    status = 202 if created else 200
    return jsonify(body), status, {"Location": body["status_url"]}


@bp.get("/<job_id>")
def get_job(job_id: str) -> Response:
    owner = authenticate()
    with transaction(settings().database_url) as session:
        return jsonify(job_json(owned_job(session, job_id, owner)))


@bp.post("/<job_id>/cancel")
def cancel_job(job_id: str) -> Response:
    owner = authenticate()

    def cancel(session: Session) -> dict[str, Any]:
        job = owned_job(session, job_id, owner, with_stages=False)
        job_service.cancel(session, job.id)
        session.refresh(job)
        return job_json(job, with_stages=False)

    return jsonify(in_transaction(settings().database_url, cancel))


@bp.get("")
def list_jobs() -> Response:
    owner = authenticate()
    args = request.args
    pages.check_query(args, ("status", "strategy", "batch_id", "limit", "cursor"))
    query = select(Job).where(Job.owner == owner)
    if status := args.get("status"):
        if status not in set(JobStatus):
            raise Problem(400, f"status must be one of {', '.join(JobStatus)}")
        query = query.where(Job.status == status)
    if strategy := args.get("strategy"):
        query = query.where(Job.strategy == strategy[:40])
    if batch_id := args.get("batch_id"):
        query = query.where(Job.batch_id == batch_id[: job_rows.ID_MAX])
    with transaction(settings().database_url) as session:
        page = pages.newest_first(
            session, query, Job, args, 50, lambda job: job_json(job, with_stages=False)
        )
    return jsonify(page)


@bp.delete("/<job_id>")
def delete_job(job_id: str) -> Response:
    """A finished single job and its stages, gone from Postgres (its cost stays counted in
    the owner's usage rollups). A batch's job goes with its batch."""
    from services.retention import delete_job as delete

    owner = authenticate()
    outcome = in_transaction(settings().database_url, lambda s: delete(s, job_id, owner))
    shown = job_id[: job_rows.ID_MAX]
    if outcome == "missing":
        raise Problem(404, f"no job {shown!r}")
    if outcome == "unfinished":
        raise Problem(409, f"job {shown} is not finished; cancel it first, then delete it")
    if outcome == "in_batch":
        raise Problem(409, f"job {shown} is a line of a batch; delete the batch instead")
    return jsonify({"id": shown, "object": "job", "deleted": True})


add_paths(
    {
        "/v1/jobs/{job_id}": {
            "delete": {
                "summary": "Delete a finished job (not a batch's) with its stages",
                "parameters": [
                    {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "deleted"},
                    "409": ERRORS["400"],
                    **ERRORS,
                },
            }
        }
    }
)
