"""A job's request: question, strategy name and parameters, validated in one place.

The CLI, the REST API and batch lines all build a `JobRequest`, so they accept and reject
exactly the same things with the same messages. Strategy names come from the strategy
registry (`services.core.strategies.STRATEGIES`), so a new strategy is accepted everywhere
once it is registered there.

Everything a client sends passes through here before it reaches Postgres, Redis or a
model, so this module also owns what "text we can keep" means (`unstorable`: no NUL, no
unpaired UTF-16 surrogate) and how client JSON is read (`read_json`: integers too long to
be any parameter become an `OversizedNumber` that validation refuses by field name; NaN and
Infinity are not JSON). The API applies the same text rule to headers, query strings and
path ids; the batch parser to custom_ids.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from services.core.params import JobParams
from services.core.strategies import STRATEGIES, is_strategy

# No parameter needs more digits than this; longer integer literals are not even converted
# (Python refuses past 4300 digits, and conversion grows quadratically before that).
MAX_INTEGER_DIGITS = 100
SHOWN_CHARS = 60  # of a client's value quoted back in an error message


class InvalidRequest(ValueError):
    """A request a client can fix: the message says what was wrong."""


class InvalidJSON(InvalidRequest):
    """Input that is not JSON at all (or not JSON this service reads)."""


class OversizedNumber:
    """An integer literal of more than MAX_INTEGER_DIGITS digits, kept as its length: no
    field accepts it, so validation names the field it was sent for."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<a {self.digits}-digit number>"


def _parse_int(literal: str) -> int | OversizedNumber:
    digits = len(literal.lstrip("-"))
    return OversizedNumber(digits) if digits > MAX_INTEGER_DIGITS else int(literal)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


# Two readers: the plain one (the C scanner converts integers itself) for the usual input,
# and one that sees every integer literal, for text holding a run of digits long enough to
# be an oversized one.
_PLAIN = json.JSONDecoder(parse_constant=_no_constant)
_CAREFUL = json.JSONDecoder(parse_int=_parse_int, parse_constant=_no_constant)
_LONG_DIGITS = re.compile(rf"[0-9]{{{MAX_INTEGER_DIGITS + 1}}}")


def read_json(data: str | bytes) -> Any:
    """Client JSON (a request body, a batch line, a params string): raises InvalidJSON with
    a short reason for anything that is not JSON, is nested too deeply, or uses NaN or
    Infinity. Strings may still hold unstorable text: the validators catch that by field."""
    try:
        if isinstance(data, bytes | bytearray):  # as json.loads reads bytes
            data = data.decode(json.detect_encoding(data), "surrogatepass")
        decoder = _CAREFUL if _LONG_DIGITS.search(data) else _PLAIN
        return decoder.decode(data)
    except json.JSONDecodeError as error:
        raise InvalidJSON(f"{error.msg} (line {error.lineno}, column {error.colno})") from None
    except UnicodeDecodeError:
        raise InvalidJSON("not valid UTF-8") from None
    except RecursionError:
        raise InvalidJSON("nested too deeply") from None
    except ValueError as error:  # NaN / Infinity
        raise InvalidJSON(str(error)) from None


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable(text: str) -> str | None:
    """Why `text` cannot be stored or sent on (Postgres text holds no NUL; a lone UTF-16
    surrogate has no UTF-8 encoding, so no database, broker or model takes it), or None."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    at = found.start() + 1
    if found.group() == "\x00":
        return f"contains a NUL character (U+0000, at character {at})"
    code = ord(found.group())
    return f"contains an unpaired UTF-16 surrogate (U+{code:04X}, at character {at}); send valid Unicode"


def escape_unstorable(text: str) -> str:
    """`text` with NUL and lone surrogates written as escapes: for echoing client input in
    messages that are themselves stored (a batch's list of invalid lines)."""
    if unstorable(text) is None:
        return text
    return _UNSTORABLE.sub(lambda found: found.group().encode("unicode_escape").decode(), text)


def shown(value: Any) -> str:
    """A client's value as a message quotes it: Python's repr for text (control and
    unstorable characters escaped), JSON otherwise, clipped."""
    if isinstance(value, OversizedNumber):
        return repr(value).strip("<>")
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = type(value).__name__
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    question: str
    strategy: str = "tandem"
    params: JobParams = JobParams()

    @field_validator("question")
    @classmethod
    def _question_storable_not_blank(cls, question: str) -> str:
        problem = unstorable(question)
        if problem:
            raise ValueError(problem)
        if not question.strip():
            raise ValueError("question is empty")
        return question

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, strategy: str) -> str:
        if is_strategy(strategy):
            return strategy
        raise ValueError(
            f"unknown strategy {shown(strategy)}; choose one of {', '.join(STRATEGIES)}"
        )


def parse_job_request(data: object, max_question_chars: int) -> JobRequest:
    """Validate raw input (a dict from JSON or the CLI) into a JobRequest, or raise
    InvalidRequest with a message naming every problem."""
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    _check_strings(data)
    try:
        request = JobRequest.model_validate(data)
    except ValidationError as error:
        raise InvalidRequest(describe_validation_error(error)) from None
    if len(request.question) > max_question_chars:
        raise InvalidRequest(
            f"question is {len(request.question)} characters; the limit is {max_question_chars}"
        )
    return request


def _check_strings(data: dict[str, Any]) -> None:
    """Refuse unstorable text in field names and string values of the request and of its
    params, naming where it is (deeper values are refused by type anyway)."""
    params = data.get("params")
    levels = [("", data), ("params.", params)] if isinstance(params, dict) else [("", data)]
    texts = [text for _, fields in levels for item in fields.items() for text in item]
    if _UNSTORABLE.search("".join(t for t in texts if isinstance(t, str))) is None:
        return  # the usual case: one search over everything
    for prefix, fields in levels:
        for name, value in fields.items():
            if isinstance(name, str) and (problem := unstorable(name)):
                raise InvalidRequest(f"{prefix.rstrip('.') or 'body'}: a field name {problem}")
            if isinstance(value, str) and (problem := unstorable(value)):
                raise InvalidRequest(f"{prefix}{_where((name,))}: {problem}")


# Errors whose message is ours (it says what was wrong) or has nothing to add.
_OWN_MESSAGES = frozenset({"value_error", "assertion_error", "extra_forbidden", "missing"})


def _json_kind(value: Any) -> str:
    if isinstance(value, OversizedNumber):
        return "a number too long to be any parameter"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a decimal point or exponent"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else type(value).__name__


def _got(value: Any) -> str:
    """What the client sent, for a message: its JSON kind, and the value if it is short."""
    kind = _json_kind(value)
    if isinstance(value, bool | int | float | str) and not isinstance(value, OversizedNumber):
        return f"{kind} ({shown(value)})"
    return kind


def _where(loc: tuple) -> str:
    parts = []
    for part in loc:
        text = str(part)
        parts.append(text if text.isprintable() and len(text) <= SHOWN_CHARS else shown(text))
    return ".".join(parts) or "body"


def _union_branch(part: object) -> bool:
    """A loc part pydantic adds for a branch of a union (cost_preference: a preset or a
    number); the message names the field instead."""
    return isinstance(part, str) and (
        part.startswith(("literal[", "constrained-")) or part in ("float", "int", "str")
    )


def describe_validation_error(error: ValidationError) -> str:
    """One line naming every field that is wrong, what it should be and what was sent:
    `params.executor_max_tokens: Input should be a valid integer; got a boolean (true)`."""
    expected: dict[str, list[str]] = {}
    got: dict[str, str] = {}
    for item in error.errors():
        loc = item["loc"]
        if item["type"] != "extra_forbidden":
            loc = tuple(part for part in loc if not _union_branch(part))
        where = _where(loc)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif item["type"] not in _OWN_MESSAGES and "input" in item:
            got[where] = _got(item["input"])
        messages = expected.setdefault(where, [])
        if message not in messages:
            messages.append(message)
    problems = []
    for where, messages in expected.items():
        # A union's branches: "Input should be 'quality', ... or 'economy', or a valid number"
        first, *others = messages
        text = ", or ".join([first, *(m.removeprefix("Input should be ") for m in others)])
        problems.append(f"{where}: {text}" + (f"; got {got[where]}" if where in got else ""))
    return "; ".join(problems)
