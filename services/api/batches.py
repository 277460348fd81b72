"""/v1/batches: upload JSONL, read progress, stream results, cancel, delete. The logic lives in
services.batches; this module adapts it to HTTP."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from flask import Blueprint, Flask, Response, current_app, jsonify, request, url_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from services import batches
from services.api import pages
from services.api.auth import authenticate
from services.api.docs import AUTH, IDEMPOTENCY_KEY, add_paths, errors
from services.api.formats import iso
from services.api.jobs import idempotency_key
from services.api.problems import Problem
from services.core.requests import InvalidRequest
from services.storage import batch_rows
from services.storage.db import in_transaction, transaction
from services.storage.models import Batch
from services.storage.statuses import ACTIVE_BATCH_STATUSES, FINAL_BATCH_STATUSES, BatchStatus

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")
log = logging.getLogger("tandem.api.batches")

CONTENT_TYPES = ("application/jsonl", "application/x-ndjson", "text/plain")
ERRORS_SHOWN = 100  # invalid lines listed in a batch's JSON (all of them are in its results)
RESULTS_FLUSH_BYTES = 64 * 1024


def init_app(app: Flask) -> None:
    settings = app.config["TANDEM"]
    limits = batches.Limits(max_owner_lines=settings.max_batch_lines_per_owner)
    app.config.setdefault("TANDEM_BATCH_LIMITS", limits)


def settings():
    return current_app.config["TANDEM"]


def start_feeding(app: Flask) -> threading.Thread:
    """Run a feeder pass from this process now, so a new batch's first jobs need not wait
    for the reconciler's; it feeds every owner's batches in turn, like any pass."""
    from services.broker import Broker

    config = app.config["TANDEM"]
    enqueue = app.extensions["tandem.enqueue"]
    broker = Broker(config.redis_url, cache_s=0)

    def run() -> None:
        try:
            batches.feed(config, enqueue, broker.depth, broker.capacity)
        except Exception as error:  # the reconciler's feeder will carry on
            log.warning("feeding after an upload stopped: %s", error)

    thread = threading.Thread(target=run, name="feed-after-upload", daemon=True)
    thread.start()
    return thread


# --- views ------------------------------------------------------------------------------


def batch_json(batch: Batch, progress: batches.Progress | None) -> dict[str, Any]:
    counts = progress.counts if progress else None
    errors = batch.errors or []
    return {
        "id": batch.id,
        "object": "batch",
        "status": batch.status,
        "strategy": batch.strategy,
        "params": batch.params,
        "lines": {
            "total": batch.total_lines,
            "valid": batch.total_lines - batch.invalid_lines,
            "invalid": batch.invalid_lines,
        },
        "request_counts": _request_counts(batch, counts),
        "counts": counts,
        "cost": progress.cost if progress else None,
        "eta_s": progress.eta_s if progress else None,
        "fed_through_line": batch.fed_through_line,
        "input_bytes": batch.input_bytes,
        "failure": (batch.metadata_ or {}).get("failure"),
        "errors": errors[:ERRORS_SHOWN],
        "errors_truncated": len(errors) > ERRORS_SHOWN,
        "created_at": iso(batch.created_at),
        "started_at": iso(batch.started_at),
        "finished_at": iso(batch.finished_at),
        "cancelled_at": iso(batch.cancelled_at),
        "status_url": url_for("batches.get_batch", batch_id=batch.id),
        "results_url": url_for("batches.batch_results", batch_id=batch.id),
    }


def _request_counts(batch: Batch, counts: dict[str, int] | None) -> dict[str, int] | None:
    """OpenAI-style totals over all lines: invalid lines count as failed."""
    if counts is None:
        return None
    return {
        "total": batch.total_lines,
        "completed": counts["succeeded"],
        "failed": counts["failed"] + batch.invalid_lines,
        "cancelled": counts["cancelled"],
        "pending": counts["queued"] + counts["running"],
    }


def owned(session: Session, batch_id: str, owner: str, lock: bool = False) -> Batch:
    """The owner's batch, or 404 (another owner's batch looks exactly like a missing one)."""
    batch = batch_rows.owned(session, batch_id, owner, lock=lock)
    if batch is None:
        raise Problem(404, f"no batch {batch_id[:40]}")
    return batch


def view(batch_id: str, owner: str) -> dict[str, Any]:
    """The batch with its progress; a batch whose jobs are all final is finalized first."""
    url = settings().database_url
    with transaction(url) as session:
        batch = owned(session, batch_id, owner)
        progress = batches.progress(session, batch)
        body = batch_json(batch, progress)
    pending = progress.counts["queued"] + progress.counts["running"]
    if batch.status in ACTIVE_BATCH_STATUSES and pending == 0 and batches.finalize_if_done(url, batch.id):
        with transaction(url) as session:
            batch = owned(session, batch_id, owner)
            body = batch_json(batch, batches.progress(session, batch))
    return body


# --- endpoints --------------------------------------------------------------------------


@bp.post("")
def create_batch() -> tuple[Response, int, dict[str, str]]:
    owner = authenticate()
    if request.mimetype not in CONTENT_TYPES:
        raise Problem(
            415,
            f"send the JSONL body with 'Content-Type: application/jsonl' "
            f"(or {', '.join(CONTENT_TYPES[1:])})",
        )
    key = idempotency_key()
    defaults = _defaults()
    current_app.extensions["tandem.admission"].check(owner)
    config = settings()
    limits = current_app.config["TANDEM_BATCH_LIMITS"]
    try:
        if key is None or not _known_key(owner, key):
            batches.check_owner_room(config.database_url, owner, limits)
        batch, created = batches.ingest(
            config.database_url,
            owner,
            request.stream,  # type: ignore[arg-type]
            defaults,
            config.max_question_chars,
            limits,
            idempotency_key=key,
        )
    except batches.BatchRejected as rejected:
        if rejected.batch_id is None:  # refused before the body was read
            _discard(request.stream)  # type: ignore[arg-type]
        raise Problem(
            rejected.status,
            rejected.reason,
            headers={"Retry-After": "60"} if rejected.status == 429 else None,
            batch_id=rejected.batch_id,
            errors=rejected.errors[:20],
        ) from None
    if not created:
        _discard(request.stream)  # type: ignore[arg-type]
        return _replayed(batch, owner)
    start_feeding(current_app._get_current_object())  # type: ignore[attr-defined]
    body = batch_json(batch, None)
    return jsonify(body), 202, {"Location": body["status_url"]}


def _known_key(owner: str, key: str) -> bool:
    """Whether this owner already used `key` (its upload answers from the first one)."""
    with transaction(settings().database_url) as session:
        return batch_rows.by_idempotency_key(session, owner, key) is not None


def _discard(stream: BinaryIO) -> None:
    """Read a body to its end unparsed, so the connection can serve the next request."""
    while stream.read(1 << 16):
        pass


def _replayed(batch: Batch, owner: str) -> tuple[Response, int, dict[str, str]]:
    """An upload repeated with its Idempotency-Key: the first upload's batch, as it is now.
    The repeat's body is drained unparsed, so it is not checked against the first."""
    if batch.status == BatchStatus.VALIDATING:
        raise Problem(
            409,
            f"an upload with this Idempotency-Key (batch {batch.id}) is still being read; "
            "retry when it is done",
            batch_id=batch.id,
            headers={"Retry-After": "5"},
        )
    body = view(batch.id, owner)
    return jsonify(body), 200, {"Location": body["status_url"]}


def _defaults() -> batches.Defaults:
    pages.check_query(request.args, ("strategy", "params"))
    try:
        return batches.parse_defaults(
            request.args.get("strategy"),
            request.args.get("params"),
            settings().max_question_chars,
        )
    except InvalidRequest as error:
        raise Problem(422, f"batch defaults: {error}") from None


@bp.get("/<batch_id>")
def get_batch(batch_id: str) -> Response:
    return jsonify(view(batch_id, authenticate()))


@bp.get("")
def list_batches() -> Response:
    owner = authenticate()
    args = request.args
    pages.check_query(args, ("status", "limit", "cursor"))
    query = select(Batch).where(Batch.owner == owner, Batch.deleted_at.is_(None))
    if status := args.get("status"):
        if status not in set(BatchStatus):
            raise Problem(400, f"status must be one of {', '.join(BatchStatus)}")
        query = query.where(Batch.status == status)
    with transaction(settings().database_url) as session:
        page = pages.newest_first(
            session,
            query,
            Batch,
            args,
            20,
            lambda row: batch_json(row, batches.progress(session, row)),
        )
    return jsonify(page)


@bp.get("/<batch_id>/results")
def batch_results(batch_id: str) -> Response:
    owner = authenticate()
    url = settings().database_url
    with transaction(url) as session:
        batch = owned(session, batch_id, owner)
        errors = list(batch.errors or [])
        status = batch.status
    lines = batches.results(url, batch.id, errors)
    return Response(
        _jsonl(lines),
        mimetype="application/jsonl",
        headers={"X-Batch-Status": status, "Cache-Control": "no-store"},
    )


def _jsonl(lines: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    buffer: list[str] = []
    size = 0
    for line in lines:
        text = json.dumps(line, ensure_ascii=False) + "\n"
        buffer.append(text)
        size += len(text)
        if size >= RESULTS_FLUSH_BYTES:
            yield "".join(buffer).encode()
            buffer, size = [], 0
    if buffer:
        yield "".join(buffer).encode()


@bp.post("/<batch_id>/cancel")
def cancel_batch(batch_id: str) -> Response:
    owner = authenticate()
    url = settings().database_url

    def cancel(session: Session) -> None:
        batch = owned(session, batch_id, owner, lock=True)
        if batch.status == BatchStatus.VALIDATING:
            raise Problem(409, "the batch is still being uploaded; cancel it once it is accepted")
        batches.cancel(session, batch)

    in_transaction(url, cancel)  # the UPDATE of many jobs can lose a deadlock: run it again
    return jsonify(view(batch_id, owner))


DELETE_BUDGET_S = 10.0  # of row deletions within the request; the reconciler does the rest


@bp.delete("/<batch_id>")
def delete_batch(batch_id: str) -> tuple[Response, int]:
    """A finished batch with its jobs and stages. It answers 404 from now on; its rows are
    deleted within the request (200) or, for a very large batch, by the reconciler (202)."""
    from services import retention

    owner = authenticate()
    url = settings().database_url
    with transaction(url) as session:
        batch = owned(session, batch_id, owner, lock=True)
        if batch.status not in FINAL_BATCH_STATUSES:
            raise Problem(409, f"batch {batch.id} is {batch.status}; cancel it, or wait for it to end")
        retention.mark_batch_deleted(session, batch)
        deleted_id = batch.id
    gone = retention.delete_batch_rows(url, deleted_id, DELETE_BUDGET_S)
    body = {"id": deleted_id, "object": "batch", "deleted": True, "rows_deleted": gone}
    return jsonify(body), 200 if gone else 202


# --- OpenAPI ----------------------------------------------------------------------------

_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
_BATCH = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Batch"}}}}
_LINE = {
    "type": "object",
    "required": ["custom_id", "question"],
    "additionalProperties": False,
    "properties": {
        "custom_id": {"type": "string", "minLength": 1, "maxLength": batches.MAX_CUSTOM_ID},
        "question": {"type": "string", "minLength": 1},
        "strategy": {"type": "string"},
        "params": {"$ref": "#/components/schemas/JobParams"},
    },
    "description": "One line of a batch upload (JSONL: one such object per line).",
}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer"}}
_SCHEMA = {
    "type": "object",
    "description": "A batch as the native API shows it.",
    "required": ["id", "object", "status", "lines", "errors", "created_at", "status_url"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["batch"]},
        "status": {"type": "string", "enum": list(BatchStatus)},
        "strategy": {"type": "string"},
        "params": {"type": "object"},
        "lines": {
            "type": "object",
            "properties": {n: {"type": "integer"} for n in ("total", "valid", "invalid")},
        },
        "request_counts": {**_COUNTS, "nullable": True},
        "counts": {
            **_COUNTS,
            "nullable": True,
            "description": "Jobs by status, plus the invalid lines.",
        },
        "cost": {
            "oneOf": [{"$ref": "#/components/schemas/Cost"}, {"type": "null"}],
            "description": "Sums over every stage recorded so far.",
        },
        "eta_s": {"type": "number", "nullable": True},
        "fed_through_line": {"type": "integer"},
        "input_bytes": {"type": "integer"},
        "failure": {"type": "string", "nullable": True},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["line", "error"],
                "properties": {
                    "line": {"type": "integer"},
                    "custom_id": {"type": "string", "nullable": True},
                    "error": {"type": "string"},
                },
            },
        },
        "errors_truncated": {"type": "boolean"},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": {"type": "string", "format": "date-time", "nullable": True},
        "finished_at": {"type": "string", "format": "date-time", "nullable": True},
        "cancelled_at": {"type": "string", "format": "date-time", "nullable": True},
        "status_url": {"type": "string"},
        "results_url": {"type": "string"},
    },
}
_UPLOAD = {
    "required": True,
    "content": {
        kind: {"schema": {"type": "string", "description": "JSONL of BatchLine"}}
        for kind in CONTENT_TYPES
    },
}

add_paths(
    {
        "/v1/batches": {
            "post": {
                "summary": "Upload a JSONL batch of questions (one job per valid line)",
                "parameters": [
                    {"name": "strategy", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "params",
                        "in": "query",
                        "description": "Default job params for every line, as JSON",
                        "schema": {"type": "string"},
                    },
                    IDEMPOTENCY_KEY,
                ],
                "requestBody": _UPLOAD,
                "responses": {
                    "202": {"description": "accepted", **_BATCH},
                    "200": {
                        "description": "the batch this Idempotency-Key already created "
                        "(the repeated body is not parsed)",
                        **_BATCH,
                    },
                    # 409: an upload with this key is still being read
                    **errors(400, 409, 413, 415, 422, *AUTH),
                },
            },
            "get": {
                "summary": "List batches, newest first",
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string"}},
                    *pages.OPENAPI_PARAMETERS,
                ],
                "responses": {
                    "200": {
                        "description": "a page of batches",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/BatchList"}
                            }
                        },
                    },
                    **errors(400, *AUTH),
                },
            },
        },
        "/v1/batches/{batch_id}": {
            "get": {
                "summary": "A batch: status, counts, cost so far, ETA, invalid lines",
                "parameters": [_ID],
                "responses": {"200": {"description": "the batch", **_BATCH}, **errors(404, *AUTH)},
            },
            "delete": {
                "summary": "Delete a finished batch with its jobs (202: the rest is deleted "
                "in the background)",
                "parameters": [_ID],
                "responses": {
                    "200": {"description": "deleted"},
                    "202": {"description": "gone from the API; rows still being deleted"},
                    **errors(404, 409, *AUTH),
                },
            },
        },
        "/v1/batches/{batch_id}/results": {
            "get": {
                "summary": "Results as JSONL, one line per input line, in input order",
                "parameters": [_ID],
                "responses": {
                    "200": {
                        "description": "streamed JSONL",
                        "content": {"application/jsonl": {"schema": {"type": "string"}}},
                    },
                    **errors(404, *AUTH),
                },
            }
        },
        "/v1/batches/{batch_id}/cancel": {
            "post": {
                "summary": "Cancel: queued jobs end, running ones stop at their next stage",
                "parameters": [_ID],
                "responses": {
                    "200": {"description": "the batch", **_BATCH},
                    **errors(404, 409, *AUTH),  # 409: still uploading
                },
            }
        },
    },
    {"Batch": _SCHEMA, "BatchLine": _LINE},
)
