"""Reading a batch upload: its batch-wide defaults and its lines, each validated like a
single job (`parse_job_request`), without holding the upload in memory.

A line is read with the same JSON reader as a REST body (`read_json`), and whatever is wrong
with it (not JSON, unstorable text in any field, a wrong type) fails that line alone, with
a message naming the field. Nothing a line holds is echoed into the stored list of invalid
lines unescaped (`LineError.to_dict`), so that list itself is always storable."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from services.core.params import JobParams
from services.core.requests import (
    InvalidJSON,
    InvalidRequest,
    JobRequest,
    escape_unstorable,
    parse_job_request,
    read_json,
    unstorable,
)
from services.storage.job_rows import stored_params

LINE_FIELDS = frozenset({"custom_id", "question", "strategy", "params"})
MAX_CUSTOM_ID = 200
MAX_ERROR_CHARS = 500
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Limits:
    """What one upload may hold (the body's byte limit is TANDEM_MAX_BODY_BYTES)."""

    max_lines: int = 1_000_000  # non-blank lines
    max_line_bytes: int = 64 * 1024  # a longer line is reported invalid
    max_invalid_lines: int = 10_000  # more invalid lines than this fail the whole batch
    # Unfinished batch lines one owner may have, this upload's included (0: no limit):
    # TANDEM_MAX_BATCH_LINES_PER_OWNER.
    max_owner_lines: int = 0


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
    # OpenAI batch lines: the request field at fault and an error code (docs/openai.md).
    param: str | None = None
    code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        found = {
            "line": self.line,
            # As stored in the batch's JSON (escaped: Postgres JSON holds no NUL, nor a lone
            # surrogate, even as a \\u escape).
            "custom_id": None if self.custom_id is None else escape_unstorable(self.custom_id),
            "error": escape_unstorable(self.error),
        }
        if self.param is not None:
            found["param"] = self.param
        if self.code is not None:
            found["code"] = self.code
        return found


# How a line becomes a job: (line number, its bytes or None when over the line limit, the
# batch's defaults, max question chars, max line bytes) -> the job, why not, or None for a
# blank line. `parse_line` reads native lines; the OpenAI batch API passes its own
# (services/api/openai/batches.py), built on `decode_line`.
LineParser = Callable[[int, bytes | None, Defaults, int, int], ParsedLine | LineError | None]


def parse_defaults(strategy: str | None, params_json: str | None, max_chars: int) -> Defaults:
    """Validate the batch-wide strategy and params (raises InvalidRequest)."""
    params: Any = {}
    if params_json:
        try:
            params = read_json(params_json)
        except InvalidJSON as error:
            raise InvalidRequest(f"params is not valid JSON: {error}") from None
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
    data = decode_line(number, raw, max_line_bytes)
    if data is None or isinstance(data, LineError):
        return data
    return _line_request(number, data, defaults, max_chars)


def decode_line(
    number: int, raw: bytes | None, max_line_bytes: int
) -> dict[str, Any] | LineError | None:
    """A line's JSON object, the reason it is not one, or None for a blank line."""
    if raw is None:
        return LineError(number, None, f"line is longer than the limit of {max_line_bytes} bytes")
    stripped = raw.strip()
    if number == 1:
        stripped = stripped.removeprefix(_BOM)
    if not stripped:
        return None
    try:
        data = read_json(stripped.decode())
    except UnicodeDecodeError:
        return LineError(number, None, "line is not valid UTF-8")
    except InvalidJSON as error:
        return LineError(number, None, f"not valid JSON: {error}")
    if not isinstance(data, dict):
        return LineError(number, None, "a line must be a JSON object")
    return data


def _line_request(
    number: int, data: dict[str, Any], defaults: Defaults, max_chars: int
) -> ParsedLine | LineError:
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        shown = custom_id[:MAX_CUSTOM_ID] if isinstance(custom_id, str) else None
        return LineError(
            number, shown, f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters"
        )
    if problem := unstorable(custom_id):
        return LineError(number, None, f"custom_id: {problem}")
    if not LINE_FIELDS.issuperset(data):
        unknown = data.keys() - LINE_FIELDS
        return LineError(number, custom_id, clip(f"unknown field(s): {', '.join(sorted(unknown))}"))
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
        return LineError(number, custom_id, clip(str(error)))
    return ParsedLine(number, custom_id, request, _params_json(request.params, defaults))


def _params_json(params: JobParams, defaults: Defaults) -> str:
    if params is defaults.validated:
        return defaults.validated_json
    return json.dumps(stored_params(params))


def clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def parse_lines(
    reader: LineReader,
    defaults: Defaults,
    max_chars: int,
    limits: Limits,
    parse: LineParser | None = None,
) -> Iterator[ParsedLine | LineError]:
    """Every non-blank line, parsed (by `parse`, default `parse_line`). Raises
    BatchRejected (413) past `limits.max_lines` non-blank lines. Duplicate custom_ids are
    not checked here."""
    parse = parse or parse_line
    count = 0
    for number, raw in reader:
        parsed = parse(number, raw, defaults, max_chars, limits.max_line_bytes)
        if parsed is None:
            continue
        count += 1
        if count > limits.max_lines:
            raise BatchRejected(413, f"too many lines: the limit is {limits.max_lines}")
        yield parsed
