"""Batches: many jobs from one JSONL upload, framework-free (the API and the CLI adapt it).

A batch is one `batches` row plus one `jobs` row per valid input line (`batch_id`, `line`,
`custom_id`). Invalid lines are kept in the batch's `errors` (line number, custom_id,
reason) and never become jobs. The life of a batch:

    validating -> in_progress -> finalizing -> completed
    validating -> failed                      (no valid line, too many lines / invalid lines)
    in_progress -> cancelling -> cancelled    (running jobs stop at their next stage boundary)

Ingest is built for size: the body is read line by line, each line validated like a
single job (`parse_job_request`), the jobs are written with one COPY (Postgres) in the
same pass, duplicate custom_ids are found by Postgres afterwards, and nothing in this
process grows with the number of lines except the (capped) list of invalid lines.

Jobs reach the queues through the feeder (`feed`, `feed_batch`): in line order, oldest
batch first, only while the deepest queue is below half of `max_queue_depth` (the other
half is left to interactive jobs). `fed_through_line` records how far a batch was fed; the
reconciler ignores jobs beyond it (they are waiting for the feeder, not lost).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, BinaryIO

from sqlalchemy import case, delete, func, insert, select, update
from sqlalchemy.orm import Session

from services.core.params import JobParams
from services.core.requests import InvalidRequest, JobRequest, parse_job_request
from services.jobs import Task, first_tasks
from services.settings import Settings
from services.storage.db import transaction
from services.storage.models import Batch, Job, Stage, utcnow
from services.storage.repository import add_unless_taken, stored_params

LINE_FIELDS = frozenset({"custom_id", "question", "strategy", "params"})
MAX_CUSTOM_ID = 200
MAX_ERROR_CHARS = 500
UNFINISHED = ("queued", "running")
ACTIVE = ("in_progress", "cancelling", "finalizing")
FINAL_BATCH = ("completed", "failed", "cancelled")
COPY_CHUNK = 5000  # rows per INSERT where COPY is not available (SQLite)
FEED_CHUNK = 1000  # jobs taken per feeder transaction
RESULTS_CHUNK = 1000  # jobs read per results query
STALE_UPLOAD_S = 3600.0  # a batch still validating after this lost its upload
COST_FIELDS = (
    "tflops",
    "prefill_tflops",
    "prompt_tokens",
    "cached_prompt_tokens",
    "generated_tokens",
)
_BOM = b"\xef\xbb\xbf"
log = logging.getLogger("tandem.batches")


@dataclass(frozen=True)
class Limits:
    """What one upload may hold (the body's byte limit is TANDEM_MAX_BODY_BYTES)."""

    max_lines: int = 1_000_000  # non-blank lines
    max_line_bytes: int = 64 * 1024  # a longer line is reported invalid
    max_invalid_lines: int = 10_000  # more invalid lines than this fail the whole batch


class BatchRejected(Exception):
    """The upload as a whole is unusable (stored as a failed batch)."""

    def __init__(self, status: int, reason: str, batch_id: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.batch_id = batch_id
        self.errors: list[dict[str, Any]] = []


@dataclass(frozen=True)
class Defaults:
    """The batch's strategy and params; a line's own `strategy` replaces the strategy and
    its `params` are merged over these, key by key."""

    strategy: str = "tandem"
    params: dict[str, Any] = field(default_factory=dict)
    validated: JobParams = field(default_factory=JobParams)
    validated_json: str = "{}"  # what a job with exactly these params stores


@dataclass(frozen=True)
class ParsedLine:
    line: int
    custom_id: str
    request: JobRequest
    params_json: str  # the job's stored params (non-default values), as JSON


@dataclass(frozen=True)
class LineError:
    line: int
    custom_id: str | None
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "custom_id": self.custom_id, "error": self.error}


# --- parsing ----------------------------------------------------------------------------


def parse_defaults(strategy: str | None, params_json: str | None, max_chars: int) -> Defaults:
    """Validate the batch-wide strategy and params (raises InvalidRequest)."""
    params: Any = {}
    if params_json:
        try:
            params = json.loads(params_json)
        except json.JSONDecodeError as error:
            raise InvalidRequest(f"params is not valid JSON: {error.msg}") from None
        except (ValueError, RecursionError):  # a number too long, nesting too deep
            raise InvalidRequest("params is not valid JSON: number too long or too deep") from None
        if not isinstance(params, dict):
            raise InvalidRequest("params must be a JSON object")
    strategy = strategy or "tandem"
    request = parse_job_request(
        {"question": "?", "strategy": strategy, "params": params}, max_chars
    )
    stored = json.dumps(stored_params(request.params))
    return Defaults(strategy, params, request.params, stored)


class LineReader:
    """Physical lines of a byte stream, numbered from 1, without reading it all: a line over
    `max_line_bytes` comes back as None (and is skipped to its end)."""

    def __init__(self, stream: BinaryIO, max_line_bytes: int) -> None:
        raw = stream if hasattr(stream, "peek") else io.BufferedReader(stream, 1 << 16)  # type: ignore[arg-type]
        self._stream = raw
        self._max = max_line_bytes
        self.bytes_read = 0

    def __iter__(self) -> Iterator[tuple[int, bytes | None]]:
        number = 0
        while True:
            chunk = self._stream.readline(self._max + 1)
            if not chunk:
                return
            number += 1
            self.bytes_read += len(chunk)
            if len(chunk) > self._max and not chunk.endswith(b"\n"):
                self._skip_rest(chunk)
                yield number, None
            else:
                yield number, chunk

    def _skip_rest(self, chunk: bytes) -> None:
        while chunk and not chunk.endswith(b"\n"):
            chunk = self._stream.readline(1 << 16)
            self.bytes_read += len(chunk)


def parse_line(
    number: int, raw: bytes | None, defaults: Defaults, max_chars: int, max_line_bytes: int
) -> ParsedLine | LineError | None:
    """One input line: a job request, the reason it is invalid, or None for a blank line."""
    if raw is None:
        return LineError(number, None, f"line is longer than the limit of {max_line_bytes} bytes")
    stripped = raw.strip()
    if number == 1:
        stripped = stripped.removeprefix(_BOM)
    if not stripped:
        return None
    try:
        data = json.loads(stripped.decode())
    except UnicodeDecodeError:
        return LineError(number, None, "line is not valid UTF-8")
    except json.JSONDecodeError as error:
        return LineError(number, None, f"not valid JSON: {error.msg} (column {error.colno})")
    except (ValueError, RecursionError):  # a number too long, nesting too deep
        return LineError(number, None, "not valid JSON: too long a number or too deep nesting")
    if not isinstance(data, dict):
        return LineError(number, None, "a line must be a JSON object")
    return _line_request(number, data, defaults, max_chars)


def _line_request(
    number: int, data: dict[str, Any], defaults: Defaults, max_chars: int
) -> ParsedLine | LineError:
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        shown = custom_id[:MAX_CUSTOM_ID] if isinstance(custom_id, str) else None
        return LineError(
            number, shown, f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters"
        )
    if not LINE_FIELDS.issuperset(data):
        unknown = data.keys() - LINE_FIELDS
        return LineError(number, custom_id, f"unknown field(s): {', '.join(sorted(unknown))}")
    params = data.get("params")
    if params is not None and not isinstance(params, dict):
        return LineError(number, custom_id, "params must be a JSON object")
    fields: dict[str, Any] = {
        "strategy": data.get("strategy", defaults.strategy),
        "params": {**defaults.params, **params} if params else defaults.validated,
    }
    if "question" in data:
        fields["question"] = data["question"]
    try:
        request = parse_job_request(fields, max_chars)
    except InvalidRequest as error:
        return LineError(number, custom_id, _clip(str(error)))
    if "\x00" in request.question or "\x00" in custom_id:
        return LineError(number, custom_id, "question and custom_id may not contain NUL")
    return ParsedLine(number, custom_id, request, _params_json(request.params, defaults))


def _params_json(params: JobParams, defaults: Defaults) -> str:
    if params is defaults.validated:
        return defaults.validated_json
    return json.dumps(stored_params(params))


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def parse_lines(
    reader: LineReader, defaults: Defaults, max_chars: int, limits: Limits
) -> Iterator[ParsedLine | LineError]:
    """Every non-blank line, parsed. Raises BatchRejected (413) past `limits.max_lines`
    non-blank lines. Duplicate custom_ids are not checked here."""
    count = 0
    for number, raw in reader:
        parsed = parse_line(number, raw, defaults, max_chars, limits.max_line_bytes)
        if parsed is None:
            continue
        count += 1
        if count > limits.max_lines:
            raise BatchRejected(413, f"too many lines: the limit is {limits.max_lines}")
        yield parsed


# --- ingest -----------------------------------------------------------------------------


@dataclass
class _Tally:
    lines: int = 0
    errors: list[LineError] = field(default_factory=list)


def ingest(
    url: str,
    owner: str,
    stream: BinaryIO,
    defaults: Defaults,
    max_chars: int,
    limits: Limits = Limits(),
    idempotency_key: str | None = None,
) -> tuple[Batch, bool]:
    """Store a batch and one queued job per valid line of `stream`. Returns the batch
    (in_progress) and True. Raises BatchRejected when the upload is unusable; the batch is
    then stored as failed with its reason and errors. Jobs are not enqueued here: see
    `feed`. An `idempotency_key` this owner used before returns that upload's batch and
    False, without reading `stream` (see `_open`)."""
    batch_id, created = _open(url, owner, defaults, idempotency_key)
    if not created:
        with transaction(url) as session:
            return session.get_one(Batch, batch_id), False
    reader = LineReader(stream, limits.max_line_bytes)
    tally = _Tally()
    try:
        with transaction(url) as session:
            batch = session.get_one(Batch, batch_id)
            rows = _rows(batch, reader, defaults, max_chars, limits, tally)
            inserted = write_jobs(session, rows)
            duplicates = _remove_duplicates(session, batch_id, limits, len(tally.errors))
            tally.errors += duplicates
            _finish_validation(batch, tally, inserted - len(duplicates), reader.bytes_read)
            return batch, True
    except BatchRejected as rejected:
        _store_rejection(url, batch_id, rejected, tally, reader.bytes_read)
        raise
    except Exception as error:  # a broken upload, a body over the byte limit, a bug
        reason = getattr(error, "description", None) or f"{type(error).__name__}: {error}"
        try:
            broken = BatchRejected(500, _clip(str(reason)))
            _store_rejection(url, batch_id, broken, tally, 0, upload_broke=True)
        except Exception as also:  # the database is gone too: the feeder fails it later
            log.warning("could not mark batch %s failed: %s", batch_id, also)
        raise


def _open(
    url: str, owner: str, defaults: Defaults, idempotency_key: str | None
) -> tuple[str, bool]:
    """The new batch's id and True; or, for a key this owner used before, that batch's id
    and False. A key whose upload broke off (its batch failed before it was read to the
    end) is free again: a client retries exactly that case."""
    with transaction(url) as session:
        if idempotency_key:
            earlier = _by_idempotency_key(session, owner, idempotency_key)
            if earlier is not None and not (earlier.metadata_ or {}).get("upload_broke"):
                return earlier.id, False
            if earlier is not None:
                earlier.idempotency_key = None
                session.flush()
        batch = Batch(
            owner=owner,
            strategy=defaults.strategy,
            params=defaults.params,
            idempotency_key=idempotency_key,
        )
        earlier = add_unless_taken(
            session, batch, lambda: _by_idempotency_key(session, owner, idempotency_key or "")
        )
        return (earlier.id, False) if earlier else (batch.id, True)


def _by_idempotency_key(session: Session, owner: str, key: str) -> Batch | None:
    return session.scalar(
        select(Batch).where(Batch.owner == owner, Batch.idempotency_key == key).with_for_update()
    )


def _rows(
    batch: Batch,
    reader: LineReader,
    defaults: Defaults,
    max_chars: int,
    limits: Limits,
    tally: _Tally,
) -> Iterator[tuple]:
    """Job rows for COPY, in JOB_COLUMNS order; invalid lines go to `tally.errors`."""
    now = utcnow()
    owner, batch_id = batch.owner, batch.id
    for parsed in parse_lines(reader, defaults, max_chars, limits):
        tally.lines += 1
        if isinstance(parsed, LineError):
            tally.errors.append(parsed)
            if len(tally.errors) > limits.max_invalid_lines:
                raise _too_many_invalid(limits)
            continue
        request = parsed.request
        yield (
            "job_" + os.urandom(16).hex(),  # the same shape as new_id("job"), faster
            owner,
            request.strategy,
            request.question,
            parsed.params_json,
            batch_id,
            parsed.line,
            parsed.custom_id,
            now,
        )


JOB_COLUMNS = (
    "id",
    "owner",
    "strategy",
    "question",
    "params",
    "batch_id",
    "line",
    "custom_id",
    "created_at",
)


def write_jobs(session: Session, rows: Iterable[tuple]) -> int:
    """Insert queued jobs from `rows` (JOB_COLUMNS order): one COPY on Postgres, chunked
    INSERTs elsewhere. Returns how many."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        return _insert_chunks(session, rows)
    columns = (*JOB_COLUMNS, "status", "summary", "cancel_requested", "attempts", "updated_at")
    statement = f"COPY jobs ({', '.join(columns)}) FROM STDIN"
    driver = connection.connection.driver_connection
    count = 0
    buffer: list[str] = []
    with driver.cursor() as cursor, cursor.copy(statement) as copy:  # type: ignore[union-attr]
        for row in rows:
            buffer.append(_copy_line(row))
            count += 1
            if len(buffer) >= COPY_CHUNK:
                copy.write("".join(buffer))
                buffer.clear()
        if buffer:
            copy.write("".join(buffer))
    return count


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_line(row: tuple) -> str:
    """One row in COPY's text format (tab-separated, backslash escapes); formatting it here
    is several times faster than adapting each value (`write_row`)."""
    job_id, owner, strategy, question, params, batch_id, line, custom_id, created = row
    when = _timestamp(created)
    fields = (
        job_id,
        _escape(owner),
        _escape(strategy),
        _escape(question),
        _escape(params),
        batch_id,
        str(line),
        _escape(custom_id),
        when,
        "queued",
        "{}",
        "f",
        "0",
        when,
    )
    return "\t".join(fields) + "\n"


def _escape(text: str) -> str:
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return text.translate(_COPY_ESCAPES)
    return text


@functools.lru_cache(maxsize=8)
def _timestamp(moment: datetime) -> str:
    return moment.isoformat()


def _insert_chunks(session: Session, rows: Iterable[tuple]) -> int:
    count = 0
    chunk: list[dict[str, Any]] = []
    for row in rows:
        values = dict(zip(JOB_COLUMNS, row, strict=True))
        values["params"] = json.loads(values["params"])
        chunk.append({**values, "status": "queued", "summary": {}, "updated_at": row[-1]})
        if len(chunk) >= COPY_CHUNK:
            count += _insert(session, chunk)
            chunk = []
    return count + (_insert(session, chunk) if chunk else 0)


def _insert(session: Session, chunk: list[dict[str, Any]]) -> int:
    session.execute(insert(Job), chunk)
    return len(chunk)


def _remove_duplicates(
    session: Session, batch_id: str, limits: Limits, invalid_so_far: int
) -> list[LineError]:
    """Delete the jobs whose custom_id an earlier line of the batch already used."""
    first = func.min(Job.line).over(partition_by=Job.custom_id).label("first")
    ranked = select(Job.id, Job.line, Job.custom_id, first).where(Job.batch_id == batch_id)
    ranked_sq = ranked.subquery()
    query = select(ranked_sq).where(ranked_sq.c.line != ranked_sq.c.first)
    errors: list[LineError] = []
    ids: list[str] = []
    for row in session.execute(query.execution_options(yield_per=FEED_CHUNK)):
        if invalid_so_far + len(errors) >= limits.max_invalid_lines:
            raise _too_many_invalid(limits)
        ids.append(row.id)
        message = f"duplicate custom_id {row.custom_id!r} (first used on line {row.first})"
        errors.append(LineError(row.line, row.custom_id, message))
    for start in range(0, len(ids), FEED_CHUNK):
        session.execute(delete(Job).where(Job.id.in_(ids[start : start + FEED_CHUNK])))
    return errors


def _too_many_invalid(limits: Limits) -> BatchRejected:
    return BatchRejected(
        422,
        f"more than {limits.max_invalid_lines} invalid lines; fix the file and upload it again",
    )


def _finish_validation(batch: Batch, tally: _Tally, valid: int, input_bytes: int) -> None:
    if valid == 0:
        reason = "no valid line in the upload" if tally.lines else "the upload has no lines"
        raise BatchRejected(422, reason, batch.id)
    now = utcnow()
    batch.total_lines = tally.lines
    batch.invalid_lines = len(tally.errors)
    batch.errors = [error.to_dict() for error in sorted(tally.errors, key=lambda e: e.line)]
    batch.input_bytes = input_bytes
    batch.status = "in_progress"
    batch.started_at = now


def _store_rejection(
    url: str,
    batch_id: str,
    rejected: BatchRejected,
    tally: _Tally,
    input_bytes: int,
    upload_broke: bool = False,
) -> None:
    errors = sorted(tally.errors, key=lambda e: e.line)[:1000]
    rejected.batch_id = batch_id
    rejected.errors = [error.to_dict() for error in errors]
    with transaction(url) as session:
        batch = session.get_one(Batch, batch_id)
        batch.status = "failed"
        batch.total_lines = tally.lines
        batch.invalid_lines = len(tally.errors)
        batch.errors = rejected.errors
        batch.input_bytes = input_bytes
        failure = {"failure": rejected.reason, **({"upload_broke": True} if upload_broke else {})}
        batch.metadata_ = {**(batch.metadata_ or {}), **failure}
        batch.finished_at = utcnow()


# --- reading ----------------------------------------------------------------------------


@dataclass
class Progress:
    counts: dict[str, int]  # jobs by status, plus "invalid" lines
    cost: dict[str, float]
    eta_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "cost": self.cost, "eta_s": self.eta_s}


def owned_batch(session: Session, batch_id: str, owner: str, lock: bool = False) -> Batch | None:
    query = select(Batch).where(Batch.id == batch_id[:40], Batch.owner == owner)
    return session.scalar(query.with_for_update() if lock else query)


def status_counts(session: Session, batch_id: str) -> dict[str, int]:
    rows = session.execute(
        select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
    )
    counts = dict.fromkeys(("queued", "running", "succeeded", "failed", "cancelled"), 0)
    counts.update({status: int(n) for status, n in rows})
    return counts


def cost_so_far(session: Session, batch_id: str) -> dict[str, float]:
    sums = [func.coalesce(func.sum(getattr(Stage, name)), 0) for name in COST_FIELDS]
    row = session.execute(
        select(*sums).join(Job, Job.id == Stage.job_id).where(Job.batch_id == batch_id)
    ).one()
    return {name: _number(value) for name, value in zip(COST_FIELDS, row, strict=True)}


def _number(value: Any) -> float:
    number = float(value or 0)
    return int(number) if number.is_integer() else round(number, 9)


def progress(session: Session, batch: Batch) -> Progress:
    """Counts, cost and ETA; frozen at finalization, computed from the jobs until then."""
    final = (batch.metadata_ or {}).get("final")
    if batch.status in FINAL_BATCH and final:
        return Progress(final["counts"], final["cost"], None)
    counts = status_counts(session, batch.id)
    counts["invalid"] = batch.invalid_lines
    cost = cost_so_far(session, batch.id)
    return Progress(counts, cost, _eta(batch, counts))


def _eta(batch: Batch, counts: dict[str, int]) -> float | None:
    done = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    left = counts["queued"] + counts["running"]
    if batch.status != "in_progress" or not batch.started_at or done == 0 or left == 0:
        return 0.0 if left == 0 and batch.status == "in_progress" else None
    elapsed = (utcnow() - batch.started_at).total_seconds()
    return round(elapsed / done * left, 1)


def results(url: str, batch_id: str, errors: Sequence[dict[str, Any]]) -> Iterator[dict]:
    """One result per non-blank input line, in line order: the batch's jobs (with their
    current status, so it works while the batch runs) merged with its invalid lines. Reads
    the jobs in keyset chunks, each in its own short transaction."""
    invalid = iter(sorted(errors, key=lambda e: e["line"]))
    pending = next(invalid, None)
    last = 0
    while True:
        rows, costs = _results_chunk(url, batch_id, last)
        for row in rows:
            while pending is not None and pending["line"] < row.line:
                yield _invalid_result(pending)
                pending = next(invalid, None)
            yield _job_result(row, costs.get(row.id))
        if len(rows) < RESULTS_CHUNK:
            break
        last = rows[-1].line
    while pending is not None:
        yield _invalid_result(pending)
        pending = next(invalid, None)


def _results_chunk(url: str, batch_id: str, after: int) -> tuple[list, dict[str, dict]]:
    with transaction(url) as session:
        rows = session.execute(
            select(Job.id, Job.line, Job.custom_id, Job.status, Job.answer, Job.error)
            .where(Job.batch_id == batch_id, Job.line > after)
            .order_by(Job.line)
            .limit(RESULTS_CHUNK)
        ).all()
        if not rows:
            return [], {}
        sums = [func.sum(getattr(Stage, name)) for name in COST_FIELDS]
        stages = session.execute(
            select(Stage.job_id, *sums)
            .where(Stage.job_id.in_([row.id for row in rows]))
            .group_by(Stage.job_id)
        )
        costs = {
            job_id: {name: _number(v) for name, v in zip(COST_FIELDS, values, strict=True)}
            for job_id, *values in stages
        }
    return rows, costs


def _job_result(row: Any, cost: dict[str, float] | None) -> dict[str, Any]:
    return {
        "custom_id": row.custom_id,
        "line": row.line,
        "job_id": row.id,
        "status": row.status,
        "answer": row.answer,
        "cost": cost or dict.fromkeys(COST_FIELDS, 0),
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


# --- cancel and finalize ------------------------------------------------------------------


def cancel(session: Session, batch: Batch) -> bool:
    """Cancel a batch (the caller holds its row lock): queued jobs end now in one UPDATE,
    running ones stop at their next stage boundary, finished ones are kept. Returns whether
    anything changed (a finished or already cancelling batch is left as it is)."""
    if batch.status != "in_progress":
        return False
    now = utcnow()
    queued = Job.status == "queued"
    # Lock the rows in id order first: an UPDATE takes them in scan order, which can cross
    # a worker or the reconciler locking the same jobs and end in a deadlock.
    unfinished = (
        select(Job.id)
        .where(Job.batch_id == batch.id, Job.status.in_(UNFINISHED))
        .order_by(Job.id)
        .with_for_update()
    )
    session.execute(
        update(Job)
        .where(Job.id.in_(unfinished.scalar_subquery()))
        .values(
            cancel_requested=True,
            status=case((queued, "cancelled"), else_=Job.status),
            finished_at=case((queued, now), else_=Job.finished_at),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    batch.status = "cancelling"
    batch.cancelled_at = now
    return True


def has_unfinished(session: Session, batch_id: str) -> bool:
    query = select(Job.id).where(Job.batch_id == batch_id, Job.status.in_(UNFINISHED)).limit(1)
    return session.scalar(query) is not None


def finalize_if_done(url: str, batch_id: str) -> bool:
    """When every job of the batch is final: in_progress -> finalizing -> completed (or
    cancelling -> cancelled), freezing its counts and cost. Returns whether it finalized."""
    with transaction(url) as session:
        batch = _lock(session, batch_id, ("in_progress", "cancelling", "finalizing"))
        if batch is None or has_unfinished(session, batch_id):
            return False
        if batch.status == "in_progress":
            batch.status = "finalizing"
    with transaction(url) as session:
        batch = _lock(session, batch_id, ("cancelling", "finalizing"))
        if batch is None:
            return False
        done = progress(session, batch)
        batch.metadata_ = {**(batch.metadata_ or {}), "final": done.to_dict()}
        batch.status = "cancelled" if batch.status == "cancelling" else "completed"
        batch.finished_at = utcnow()
        return True


def _lock(session: Session, batch_id: str, statuses: Sequence[str]) -> Batch | None:
    return session.scalar(
        select(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(statuses))
        .with_for_update(skip_locked=True)
    )


# --- feeding ----------------------------------------------------------------------------

Enqueue = Callable[[Sequence[Task]], None]


def feed_target(settings: Settings) -> int:
    """How deep batches may fill the deepest queue: half of TANDEM_MAX_QUEUE_DEPTH."""
    return max(1, settings.max_queue_depth // 2)


def feed_batch(
    url: str, batch_id: str, enqueue: Enqueue, room: Callable[[], int], budget_s: float = 5.0
) -> int:
    """Put the batch's next jobs on the queues while `room()` says there is room (and for
    at most `budget_s`). Returns how many jobs were enqueued."""
    fed = 0
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        space = room()
        if space <= 0:
            break
        taken = _take(url, batch_id, min(space, FEED_CHUNK))
        if taken is None:
            break
        tasks, exhausted = taken
        if tasks:
            enqueue(tasks)
            fed += len({task.job_id for task in tasks})
        if exhausted:
            break
    return fed


def _take(url: str, batch_id: str, limit: int) -> tuple[list[Task], bool] | None:
    """Advance the batch's feed cursor over its next `limit` jobs and return their first
    tasks (to enqueue after this commits) and whether the batch is now fully fed. None when
    the batch is not in progress or another feeder holds it."""
    with transaction(url) as session:
        batch = _lock(session, batch_id, ("in_progress",))
        if batch is None:
            return None
        jobs = list(
            session.scalars(
                select(Job)
                .where(Job.batch_id == batch_id, Job.line > batch.fed_through_line)
                .order_by(Job.line)
                .limit(limit)
            )
        )
        if not jobs:
            return [], True
        queued = [job for job in jobs if job.status == "queued"]
        if queued:
            # Fresh `updated_at`: time spent waiting for the feeder is not time lost on a queue.
            session.execute(
                update(Job)
                .where(Job.id.in_([job.id for job in queued]), Job.status == "queued")
                .values(updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
        batch.fed_through_line = jobs[-1].line
        tasks = [task for job in queued for task in first_tasks(job)]
        return tasks, len(jobs) < limit


def unfed_batches(session: Session) -> list[str]:
    """Batches in progress with jobs not yet fed, oldest first."""
    unfed = (
        select(Job.id).where(Job.batch_id == Batch.id, Job.line > Batch.fed_through_line).exists()
    )
    query = select(Batch.id).where(Batch.status == "in_progress", unfed).order_by(Batch.created_at)
    return list(session.scalars(query))


def feed(
    settings: Settings,
    enqueue: Enqueue,
    queue_depth: Callable[[str], int] | None,
    budget_s: float = 5.0,
) -> int:
    """One feeder pass (run by the reconciler and `tandem batch feed`): fail uploads that
    died while validating, finalize batches whose jobs are all final, then top up the queues
    from the oldest batches. Returns how many jobs were enqueued."""
    from services.broker import QUEUES

    url = settings.database_url
    fail_stale_uploads(url)
    with transaction(url) as session:
        active = list(session.scalars(select(Batch.id).where(Batch.status.in_(ACTIVE))))
        waiting = unfed_batches(session)
    for batch_id in active:
        finalize_if_done(url, batch_id)
    target = feed_target(settings)

    def room() -> int:
        if queue_depth is None:
            return target
        return target - max(queue_depth(queue) for queue in QUEUES)

    fed = 0
    deadline = time.monotonic() + budget_s
    for batch_id in waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        fed += feed_batch(url, batch_id, enqueue, room, left)
    return fed


def fail_stale_uploads(url: str, older_than_s: float = STALE_UPLOAD_S) -> int:
    """A batch still validating long after its upload began lost its request (a crashed API
    process): mark it failed."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    with transaction(url) as session:
        stale = list(
            session.scalars(
                select(Batch)
                .where(Batch.status == "validating", Batch.created_at < cutoff)
                .with_for_update(skip_locked=True)
            )
        )
        for batch in stale:
            batch.status = "failed"
            failure = {"failure": "the upload was interrupted", "upload_broke": True}
            batch.metadata_ = {**(batch.metadata_ or {}), **failure}
            batch.finished_at = utcnow()
        return len(stale)
