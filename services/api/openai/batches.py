"""OpenAI-format batches on the native /v1/batches routes.

Two APIs share /v1/batches (docs/openai.md, "Two APIs, one /v1/batches"); the native
blueprint hands every request to `take_over` first, which serves what belongs to the
OpenAI API and leaves the rest to the native views:

- POST /v1/batches with `Content-Type: application/json` is an OpenAI batch
  (`{input_file_id, endpoint, completion_window, metadata}`); a JSONL body is native.
- A batch remembers which API created it (`batches.api`): GET /v1/batches/{id} and
  POST /v1/batches/{id}/cancel answer in that API's shape.
- GET /v1/batches shows each batch in the shape of the API that created it, paged by
  `after` (OpenAI) or `cursor` (native), and carries both pages' fields; with the native
  `status` filter or `cursor` it is the native list (every batch in the native shape).
- Errors on these routes carry both shapes (errors.dual_response).

An OpenAI batch is ingested by the native pipeline (one COPY, the feeder, the lanes, fair
shares): its input file is read from Postgres line by line and each line is parsed by
`line_parser` (validated exactly like a chat completion request); a bad line becomes an
error-file line, not the end of the batch. Past its completion window the batch expires
(services/batches/lifecycle.py), and when it ends its output and error files are written
(services/files/batch_output.py).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from flask import Response, current_app, jsonify, request
from pydantic import ValidationError
from sqlalchemy import and_, or_, select

from services import batches
from services.api import pages
from services.api.auth import authenticate
from services.api.jobs import idempotency_key
from services.api.openai import mapping
from services.api.openai.errors import dual_errors
from services.api.openai.protocol import (
    BatchCreateRequest,
    BatchErrorItem,
    BatchErrors,
    BatchRequestCounts,
    BatchTandem,
    BatchUsage,
    CostTotals,
    InputTokensDetails,
    OpenAIBatch,
    OpenAIError,
    OutputTokensDetails,
)
from services.api.problems import Problem
from services.batches.parsing import (
    MAX_CUSTOM_ID,
    Defaults,
    LineError,
    LineParser,
    ParsedLine,
    clip,
    decode_line,
)
from services.files import FileReader
from services.settings import Settings
from services.storage import batch_rows, file_rows
from services.storage.db import in_transaction, transaction
from services.storage.job_rows import stored_params
from services.storage.models import Batch, utcnow
from services.storage.statuses import ACTIVE_BATCH_STATUSES, BatchStatus

ENDPOINTS = ("/v1/chat/completions",)
OPENAI_FIELDS = {"input_file_id", "endpoint", "completion_window"}
COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
ERRORS_SHOWN = 100
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
NATIVE_LIST_QUERY = ("cursor", "status")


def settings() -> Settings:
    return current_app.config["TANDEM"]


# --- the dispatch -----------------------------------------------------------------------


def take_over() -> Response | None:
    """Serve the request if it belongs to the OpenAI API (see the module docstring); None
    lets the native view serve it."""
    endpoint = request.endpoint
    if endpoint == "batches.create_batch" and request.mimetype == "application/json":
        return create()
    if endpoint == "batches.list_batches" and not set(NATIVE_LIST_QUERY) & set(request.args):
        return list_batches()
    if endpoint in ("batches.get_batch", "batches.cancel_batch"):
        return by_id(endpoint, request.view_args["batch_id"])  # type: ignore[index]
    return None


def _peek_owner() -> str | None:
    """The key's owner without counting the request against its rate (the native view,
    if it serves the request, counts it)."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    cache = current_app.extensions["tandem.keys"]
    return cache.owner(settings(), key.strip(), request.remote_addr or "")


@dual_errors
def by_id(endpoint: str, batch_id: str) -> Response | None:
    owner = _peek_owner()
    if owner is None or "\x00" in batch_id:
        return None  # the native view answers the 401 (or the id Postgres cannot compare)
    with transaction(settings().database_url) as session:
        batch = batch_rows.owned(session, batch_id, owner)
        api = batch.api if batch is not None else None
    if api == "native":
        return None
    authenticate()  # count the request; a missing batch is answered here, in both shapes
    if api is None:
        raise Problem(404, f"no batch {batch_id[:40]}")
    if endpoint == "batches.cancel_batch":
        return jsonify(cancel(batch_id, owner))
    return jsonify(view(batch_id, owner))


# --- create -----------------------------------------------------------------------------


@dual_errors
def create() -> Response:
    owner = authenticate()
    config = settings()
    spec = _create_request()
    key = idempotency_key()
    with transaction(config.database_url) as session:
        file = file_rows.owned(session, spec.input_file_id, owner)
        if file is None:
            raise OpenAIError(
                404,
                f"No such File object: {spec.input_file_id[:80]}",
                param="input_file_id",
                code="not_found",
            )
        if file.purpose != "batch":
            raise OpenAIError(
                400,
                f"the file {file.id} has purpose {file.purpose!r}; a batch reads a file "
                "uploaded with purpose 'batch'",
                param="input_file_id",
            )
    current_app.extensions["tandem.admission"].check(owner)
    columns = {
        "api": "openai",
        "input_file_id": spec.input_file_id,
        "endpoint": spec.endpoint,
        "completion_window": spec.completion_window,
        "expires_at": utcnow() + COMPLETION_WINDOWS[spec.completion_window],
        "user_metadata": spec.metadata,
    }
    limits = current_app.config["TANDEM_BATCH_LIMITS"]
    try:
        batch, created = batches.ingest(
            config.database_url,
            owner,
            FileReader(config.database_url, spec.input_file_id),  # type: ignore[arg-type]
            Defaults(),
            config.max_question_chars,
            limits,
            idempotency_key=key,
            parse=line_parser(spec.endpoint),
            columns=columns,
        )
    except batches.BatchRejected as rejected:  # stored as a failed batch: OpenAI shows it so
        batch_id = rejected.batch_id or ""
        return jsonify(view(batch_id, owner))
    if created:
        from services.api.batches import start_feeding

        start_feeding(current_app._get_current_object())  # type: ignore[attr-defined]
    return jsonify(view(batch.id, owner))


def _create_request() -> BatchCreateRequest:
    raw = request.get_data(cache=False)
    try:
        body = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        body = None
    if not isinstance(body, dict) or not OPENAI_FIELDS & body.keys():
        # Not an OpenAI batch request: most likely a native JSONL upload sent as JSON.
        raise OpenAIError(
            415,
            "send a native batch as the JSONL body with 'Content-Type: application/jsonl', or "
            "an OpenAI batch as a JSON object {input_file_id, endpoint, completion_window} "
            "with 'Content-Type: application/json'",
        )
    try:
        spec = BatchCreateRequest.model_validate(body)
    except ValidationError as error:
        raise mapping.describe(error) from None
    if spec.endpoint not in ENDPOINTS:
        raise OpenAIError(
            400,
            f"endpoint {spec.endpoint[:80]!r} is not supported; batches run "
            f"{', '.join(ENDPOINTS)}",
            param="endpoint",
            code="unsupported_parameter",
        )
    if spec.completion_window not in COMPLETION_WINDOWS:
        raise OpenAIError(
            400,
            f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}",
            param="completion_window",
        )
    if spec.output_expires_after is not None:
        raise OpenAIError(
            400,
            "output_expires_after is not supported: output files are kept until deleted",
            param="output_expires_after",
            code="unsupported_parameter",
        )
    _check_metadata(spec.metadata)
    if "\x00" in spec.input_file_id:
        raise OpenAIError(400, "input_file_id may not contain NUL", param="input_file_id")
    return spec


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > METADATA_KEYS:
        raise OpenAIError(400, f"metadata holds at most {METADATA_KEYS} pairs", param="metadata")
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_CHARS or len(value) > METADATA_VALUE_CHARS:
            raise OpenAIError(
                400,
                f"metadata keys are at most {METADATA_KEY_CHARS} characters and values "
                f"{METADATA_VALUE_CHARS}",
                param="metadata",
            )
        if "\x00" in key or "\x00" in value:
            raise OpenAIError(400, "metadata may not contain NUL", param="metadata")


def line_parser(endpoint: str) -> LineParser:
    """How an OpenAI batch line becomes a job (services.batches.parsing.LineParser)."""

    def parse(
        number: int, raw: bytes | None, defaults: Defaults, max_chars: int, max_line_bytes: int
    ) -> ParsedLine | LineError | None:
        data = decode_line(number, raw, max_line_bytes)
        if data is None or isinstance(data, LineError):
            return data
        custom_id, result = mapping.parse_batch_line(data, endpoint, max_chars, MAX_CUSTOM_ID)
        if isinstance(result, mapping.LineRefusal):
            return LineError(number, custom_id, clip(result.message), result.param, result.code)
        assert custom_id is not None
        return ParsedLine(number, custom_id, result, json.dumps(stored_params(result.params)))

    return parse


# --- read, cancel, list -----------------------------------------------------------------


def view(batch_id: str, owner: str) -> dict[str, Any]:
    """The batch in OpenAI's shape; a batch whose jobs are all final is finalized first
    (which writes its output and error files)."""
    url = settings().database_url
    with transaction(url) as session:
        batch = batch_rows.owned(session, batch_id, owner)
        if batch is None:
            raise Problem(404, f"no batch {batch_id[:40]}")
        progress = batches.progress(session, batch)
        body = batch_json(batch, progress)
    pending = progress.counts["queued"] + progress.counts["running"]
    if batch.status in ACTIVE_BATCH_STATUSES and pending == 0 and batches.finalize_if_done(url, batch.id):
        with transaction(url) as session:
            batch = batch_rows.owned(session, batch_id, owner)
            assert batch is not None
            body = batch_json(batch, batches.progress(session, batch))
    return body


def cancel(batch_id: str, owner: str) -> dict[str, Any]:
    def work(session) -> None:
        batch = batch_rows.owned(session, batch_id, owner, lock=True)
        if batch is None:
            raise Problem(404, f"no batch {batch_id[:40]}")
        if batch.status == BatchStatus.VALIDATING:
            raise Problem(409, "the batch is still being read; cancel it once it is accepted")
        batches.cancel(session, batch)

    in_transaction(settings().database_url, work)
    return view(batch_id, owner)


@dual_errors
def list_batches() -> Response:
    from services.api.batches import batch_json as native_json

    owner = authenticate()
    args = request.args
    pages.check_query(args, ("after", "limit"))
    query = select(Batch).where(Batch.owner == owner)
    with transaction(settings().database_url) as session:
        if "after" in args:
            after = batch_rows.owned(session, args["after"], owner)
            if after is None:
                raise OpenAIError(400, f"after: no batch {args['after'][:40]!r}", param="after")
            query = query.where(
                or_(
                    Batch.created_at < after.created_at,
                    and_(Batch.created_at == after.created_at, Batch.id < after.id),
                )
            )

        def shaped(row: Batch) -> dict[str, Any]:
            progress = batches.progress(session, row)
            return batch_json(row, progress) if row.api == "openai" else native_json(row, progress)

        limit = {"limit": args["limit"]} if "limit" in args else {}
        page = pages.newest_first(session, query, Batch, limit, 20, shaped)
    data = page["data"]
    page["first_id"] = data[0]["id"] if data else None
    page["last_id"] = data[-1]["id"] if data else None
    return jsonify(page)


# --- the OpenAI shape -------------------------------------------------------------------


def _at(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment else None


def batch_json(batch: Batch, progress: batches.Progress) -> dict[str, Any]:
    counts = progress.counts
    status = BatchStatus(batch.status)
    finished = _at(batch.finished_at)
    cost = progress.cost
    errors = batch.errors or []
    found = OpenAIBatch(
        id=batch.id,
        endpoint=batch.endpoint or ENDPOINTS[0],
        input_file_id=batch.input_file_id or "",
        completion_window=batch.completion_window or "24h",
        status=status.value,  # type: ignore[arg-type]
        created_at=_at(batch.created_at) or 0,
        in_progress_at=_at(batch.started_at),
        expires_at=_at(batch.expires_at),
        finalizing_at=finished if status in (BatchStatus.COMPLETED, BatchStatus.EXPIRED) else None,
        completed_at=finished if status == BatchStatus.COMPLETED else None,
        failed_at=finished if status == BatchStatus.FAILED else None,
        expired_at=_at(batch.expired_at),
        cancelling_at=_at(batch.cancelled_at),
        cancelled_at=finished if status == BatchStatus.CANCELLED else None,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        errors=BatchErrors(data=[_error_item(e) for e in errors[:ERRORS_SHOWN]]) if errors else None,
        request_counts=BatchRequestCounts(
            total=batch.total_lines,
            completed=counts["succeeded"],
            failed=counts["failed"] + counts["cancelled"] + batch.invalid_lines,
        ),
        metadata=batch.user_metadata,
        usage=BatchUsage(
            input_tokens=int(cost["prompt_tokens"]),
            output_tokens=int(cost["generated_tokens"]),
            total_tokens=int(cost["prompt_tokens"]) + int(cost["generated_tokens"]),
            input_tokens_details=InputTokensDetails(cached_tokens=int(cost["cached_prompt_tokens"])),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
        ),
        tandem=BatchTandem(
            lines={
                "total": batch.total_lines,
                "valid": batch.total_lines - batch.invalid_lines,
                "invalid": batch.invalid_lines,
            },
            counts=counts,
            cost=CostTotals(**cost),
            eta_s=progress.eta_s,
            results_url=f"/v1/batches/{batch.id}/results",
        ),
    )
    body = found.model_dump(mode="json")
    failure = (batch.metadata_ or {}).get("failure")
    if failure and not errors:
        body["errors"] = {
            "object": "list",
            "data": [{"code": "batch_failed", "line": None, "message": failure, "param": None}],
        }
    return body


def _error_item(error: dict[str, Any]) -> BatchErrorItem:
    return BatchErrorItem(
        code=error.get("code") or "invalid_request",
        line=error.get("line"),
        message=error["error"],
        param=error.get("param"),
    )
