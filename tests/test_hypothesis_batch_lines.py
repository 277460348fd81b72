"""Property-based tests of the batch line parser (`services.batches.parsing`), pure Python:
any bytes on a line, any JSON object with hostile fields, any batch-wide defaults. A line is
parsed into a job every store can keep, or is reported invalid (naming the field, and its
custom_id when that is usable) in a form that is itself storable; the parser never raises.
With the database, through the API, the same lines are fuzzed in tests/test_fuzz.py."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

pytest.importorskip("hypothesis", reason="dev extra: pip install -e '.[dev]'")

from hypothesis import given
from hypothesis import strategies as st

from services.batches.parsing import (
    MAX_CUSTOM_ID,
    Defaults,
    Limits,
    LineError,
    LineReader,
    ParsedLine,
    parse_defaults,
    parse_line,
    parse_lines,
)
from services.core.requests import InvalidRequest, unstorable
from tests.test_hypothesis_requests import (
    PROPERTY,
    assert_accepted_request_is_sound,
    assert_storable,
    hostile_text,
    json_text,
    odd_values,
    request_data,
    storable_text,
    valid_requests,
)

MAX_CHARS = 8000
MAX_LINE = 64 * 1024
DEFAULTS = Defaults()


def encode_line(value: Any, ascii_only: bool) -> bytes:
    """A line as a client would write it. Without ASCII escapes a lone surrogate has no
    UTF-8 form, so it goes as the bytes a careless encoder writes (surrogatepass)."""
    return json_text(value, ascii_only).encode("utf-8", "surrogatepass")


def line_object(draw, data: Any) -> bytes:
    """The request `data` as one JSONL line with a custom_id."""
    custom_id = draw(st.one_of(storable_text(30).filter(bool), hostile_text(30), odd_values))
    value = {"custom_id": custom_id, **data} if isinstance(data, dict) else data
    return encode_line(value, draw(st.booleans()))


@st.composite
def lines(draw) -> bytes:
    kind = draw(st.sampled_from(["request", "request", "request", "bytes", "text", "deep"]))
    if kind == "request":
        return line_object(draw, draw(request_data()))
    if kind == "bytes":
        return draw(st.binary(max_size=300)).replace(b"\n", b" ")
    if kind == "text":
        return draw(hostile_text(200)).encode("utf-8", "surrogatepass").replace(b"\n", b" ")
    depth = draw(st.integers(10, 30_000))
    return b'{"custom_id": "d", "question": ' + b"[" * depth + b"]" * depth + b"}"


def check_result(result: ParsedLine | LineError | None, raw: bytes) -> None:
    if result is None:
        assert not raw.strip()
        return
    if isinstance(result, ParsedLine):
        assert_accepted_request_is_sound(result.request)
        assert_storable(result.custom_id, "custom_id")
        assert 1 <= len(result.custom_id) <= MAX_CUSTOM_ID
        assert_storable(json.loads(result.params_json), "params_json")
        return
    assert isinstance(result, LineError) and result.error
    stored = result.to_dict()
    assert_storable(stored, "error")
    assert "\\u0000" not in json.dumps(stored)  # what the batch's JSON column receives


@PROPERTY
@given(raw=lines(), number=st.integers(1, 10**6))
def test_any_line_is_a_sound_job_or_a_storable_error(raw: bytes, number: int) -> None:
    result = parse_line(number, raw, DEFAULTS, MAX_CHARS, MAX_LINE)
    check_result(result, raw)
    if isinstance(result, LineError | ParsedLine):
        assert result.line == number


@st.composite
def one_bad_field_line(draw) -> tuple[bytes, str, str, bool]:
    """A valid line with one field made unstorable: the line, the field, its custom_id, and
    whether the line holds a surrogate written raw (then it is not UTF-8 at all)."""
    data = draw(valid_requests())
    custom_id = draw(storable_text(30).filter(lambda c: c.strip()))
    field = draw(st.sampled_from(["question", "custom_id", "params.task", "strategy"]))
    char = draw(st.sampled_from("\x00\ud800\udc00\udfff"))
    bad = draw(storable_text(10)) + char + "x"
    line: dict[str, Any] = {"custom_id": custom_id, **data}
    if field.startswith("params."):
        line["params"] = {**data.get("params", {}), field.split(".")[1]: bad}
    else:
        line[field] = bad
    ascii_only = draw(st.booleans())
    return encode_line(line, ascii_only), field, custom_id, not ascii_only and char != "\x00"


@PROPERTY
@given(case=one_bad_field_line())
def test_an_unstorable_field_fails_its_line_naming_the_field(case) -> None:
    raw, field, custom_id, not_utf8 = case
    result = parse_line(7, raw, DEFAULTS, MAX_CHARS, MAX_LINE)
    assert isinstance(result, LineError), result
    check_result(result, raw)
    if not_utf8:
        assert (result.error, result.custom_id) == ("line is not valid UTF-8", None)
        return
    assert result.error.startswith(f"{field}: contains "), result.error
    # The custom_id is reported when it is the line's own and usable.
    assert result.custom_id == (None if field == "custom_id" else custom_id)


@PROPERTY
@given(
    strategy=st.one_of(st.none(), hostile_text(20), st.sampled_from(["slm_only", "fixed:5"])),
    params=st.one_of(
        st.none(),
        hostile_text(200),
        st.builds(json_text, request_data()),
        st.integers(1, 20_000).map(lambda n: '{"seed": ' + "1" * n + "}"),
    ),
)
def test_batch_defaults_are_accepted_sound_or_refused_by_name(strategy, params) -> None:
    try:
        defaults = parse_defaults(strategy, params, MAX_CHARS)
    except InvalidRequest as error:
        assert str(error) and unstorable(str(error)) is None
    else:
        assert_storable(defaults.params, "defaults.params")
        assert_storable(json.loads(defaults.validated_json), "validated_json")
        assert_storable(defaults.strategy, "strategy")


@PROPERTY
@given(
    body=st.lists(lines() | st.just(b"") | st.just(b"   "), max_size=30),
    crlf=st.booleans(),
    long_line=st.booleans(),
)
def test_an_upload_reports_every_line_and_never_raises(body, crlf: bool, long_line: bool) -> None:
    rows = list(body)
    if long_line:
        rows.insert(len(rows) // 2, b'{"custom_id": "long", "question": "' + b"z" * 70_000 + b'"}')
    data = (b"\r\n" if crlf else b"\n").join(rows) + b"\n"
    reader = LineReader(io.BytesIO(data), MAX_LINE)
    results = list(parse_lines(reader, DEFAULTS, MAX_CHARS, Limits(max_line_bytes=MAX_LINE)))
    expected = [n for n, row in enumerate(rows, 1) if row.strip() or len(row) > MAX_LINE]
    assert [r.line for r in results] == expected
    for result in results:
        raw = rows[result.line - 1]
        if len(raw) > MAX_LINE:
            assert isinstance(result, LineError) and "longer than the limit" in result.error
        else:
            check_result(result, raw)
    assert reader.bytes_read == len(data)


def test_the_issue_cases_fail_one_line_each() -> None:
    """Issue 19: a lone surrogate in one line failed the whole upload with a 500."""
    good = b'{"custom_id": "ok", "question": "fine"}'
    bad = {
        b'{"custom_id": "s", "question": "a \\ud800"}': ("s", "question: contains an unpaired"),
        b'{"custom_id": "\\ud800", "question": "a"}': (None, "custom_id: contains an unpaired"),
        b'{"custom_id": "n\\u0000", "question": "a"}': (None, "custom_id: contains a NUL"),
        b'{"custom_id": "q", "question": "a\\u0000"}': ("q", "question: contains a NUL"),
        b'{"custom_id": "b", "question": "a", "params": {"executor_max_tokens": true}}': (
            "b",
            "params.executor_max_tokens: Input should be a valid integer; got a boolean (true)",
        ),
        b'{"custom_id": "h", "question": "a", "params": {"seed": ' + b"1" * 5000 + b"}}": (
            "h",
            "params.seed: Input should be a valid integer; got a number too long",
        ),
        b'{"custom_id": "k", "question": "a", "\\u0000": 1}': ("k", "unknown field(s): \\x00"),
    }
    upload = b"\n".join([good, *bad, good.replace(b"ok", b"ok2")]) + b"\n"
    reader = LineReader(io.BytesIO(upload), MAX_LINE)
    results = list(parse_lines(reader, DEFAULTS, MAX_CHARS, Limits()))
    assert [type(r).__name__ for r in results] == ["ParsedLine", *["LineError"] * len(bad), "ParsedLine"]
    for result, (custom_id, fragment) in zip(results[1:-1], bad.values(), strict=True):
        stored = result.to_dict()
        assert stored["custom_id"] == custom_id
        assert stored["error"].startswith(fragment), stored["error"]
        assert_storable(stored)
