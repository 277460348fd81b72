"""Storing a batch upload: one `batches` row plus one queued `jobs` row per valid line,
written with one COPY (Postgres) as the upload streams in; duplicate custom_ids are found
by Postgres afterwards; nothing in this process grows with the number of lines except the
(capped) list of invalid lines. Jobs are not queued here: the feeder does that."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from sqlalchemy.orm import Session

from services.batches.parsing import (
    BatchRejected,
    Defaults,
    Limits,
    LineError,
    LineParser,
    LineReader,
    clip,
    parse_lines,
)
from services.storage import batch_rows
from services.storage.db import add_unless_taken, transaction
from services.storage.models import Batch, utcnow
from services.storage.statuses import BatchStatus
from services.webhooks.events import EventType, emit_batch

log = logging.getLogger("tandem.batches")


@dataclass
class _Tally:
    lines: int = 0
    errors: list[LineError] = field(default_factory=list)
    room: int | None = None  # valid lines the owner may still add (None: no limit)


def over_owner_limit(limits: Limits) -> BatchRejected:
    return BatchRejected(
        429,
        f"this key's owner has {limits.max_owner_lines} unfinished batch lines, the limit "
        "(TANDEM_MAX_BATCH_LINES_PER_OWNER); wait for some batches to finish",
    )


def check_owner_room(url: str, owner: str, limits: Limits) -> None:
    """Raise BatchRejected (429) when the owner has no room for another batch line; called
    before an upload is read, so a refused upload leaves no batch behind."""
    if _owner_room(url, owner, limits) == 0:
        raise over_owner_limit(limits)


def _owner_room(url: str, owner: str, limits: Limits) -> int | None:
    if not limits.max_owner_lines:
        return None
    with transaction(url) as session:
        unfinished = batch_rows.unfinished_lines(session, owner, limits.max_owner_lines)
    return max(0, limits.max_owner_lines - unfinished)


def ingest(
    url: str,
    owner: str,
    stream: BinaryIO,
    defaults: Defaults,
    max_chars: int,
    limits: Limits = Limits(),
    idempotency_key: str | None = None,
    parse: LineParser | None = None,
    columns: dict[str, Any] | None = None,
) -> tuple[Batch, bool]:
    """Store a batch and one queued job per valid line of `stream`. Returns the batch
    (in_progress) and True. Raises BatchRejected when the upload is unusable; the batch is
    then stored as failed with its reason and errors. Jobs are not enqueued here: see
    `feed`. An `idempotency_key` this owner used before returns that upload's batch and
    False, without reading `stream` (see `_open`). `parse` reads each line (default: the
    native format); `columns` are more values of the new batch row (the OpenAI batch API
    passes its own of both)."""
    batch_id, created = _open(url, owner, defaults, idempotency_key, columns or {})
    if not created:
        with transaction(url) as session:
            return session.get_one(Batch, batch_id), False
    reader = LineReader(stream, limits.max_line_bytes)
    tally = _Tally(room=_owner_room(url, owner, limits))
    try:
        with transaction(url) as session:
            batch = session.get_one(Batch, batch_id)
            rows = _rows(batch, reader, defaults, max_chars, limits, tally, parse)
            inserted = batch_rows.write_jobs(session, rows)
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
            broken = BatchRejected(500, clip(str(reason)))
            _store_rejection(url, batch_id, broken, tally, 0, upload_broke=True)
        except Exception as also:  # the database is gone too: the feeder fails it later
            log.warning("could not mark batch %s failed: %s", batch_id, also)
        raise


def _open(
    url: str,
    owner: str,
    defaults: Defaults,
    idempotency_key: str | None,
    columns: dict[str, Any],
) -> tuple[str, bool]:
    """The new batch's id and True; or, for a key this owner used before, that batch's id
    and False. A key whose upload broke off (its batch failed before it was read to the
    end) is free again: a client retries exactly that case."""
    with transaction(url) as session:
        if idempotency_key:
            earlier = batch_rows.by_idempotency_key(session, owner, idempotency_key)
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
            **columns,
        )
        earlier = add_unless_taken(
            session, batch, lambda: batch_rows.by_idempotency_key(session, owner, idempotency_key or "")
        )
        return (earlier.id, False) if earlier else (batch.id, True)


def _rows(
    batch: Batch,
    reader: LineReader,
    defaults: Defaults,
    max_chars: int,
    limits: Limits,
    tally: _Tally,
    parse: LineParser | None,
) -> Iterator[tuple]:
    """Job rows for COPY, in `batch_rows.JOB_COLUMNS` order; invalid lines go to `tally.errors`."""
    now = utcnow()
    owner, batch_id = batch.owner, batch.id
    for parsed in parse_lines(reader, defaults, max_chars, limits, parse):
        tally.lines += 1
        if isinstance(parsed, LineError):
            tally.errors.append(parsed)
            if len(tally.errors) > limits.max_invalid_lines:
                raise _too_many_invalid(limits)
            continue
        if tally.room is not None:
            if tally.room == 0:
                raise over_owner_limit(limits)
            tally.room -= 1
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


def _remove_duplicates(
    session: Session, batch_id: str, limits: Limits, invalid_so_far: int
) -> list[LineError]:
    """Delete the jobs whose custom_id an earlier line of the batch already used."""
    errors: list[LineError] = []
    ids: list[str] = []
    for row in batch_rows.duplicate_lines(session, batch_id):
        if invalid_so_far + len(errors) >= limits.max_invalid_lines:
            raise _too_many_invalid(limits)
        ids.append(row.id)
        message = f"duplicate custom_id {row.custom_id!r} (first used on line {row.first})"
        errors.append(LineError(row.line, row.custom_id, message))
    batch_rows.delete_jobs(session, ids)
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
    batch.status = BatchStatus.IN_PROGRESS
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
        batch.status = BatchStatus.FAILED
        batch.total_lines = tally.lines
        batch.invalid_lines = len(tally.errors)
        batch.errors = rejected.errors
        batch.input_bytes = input_bytes
        failure = {"failure": rejected.reason, **({"upload_broke": True} if upload_broke else {})}
        batch.metadata_ = {**(batch.metadata_ or {}), **failure}
        batch.finished_at = utcnow()
        emit_batch(session, batch, EventType.BATCH_FAILED)
