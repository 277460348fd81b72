"""Property-based tests of the one job request parser (`services.core.requests`): whatever a
client sends (arbitrary unicode with lone surrogates, NUL, bidi marks, very long strings;
huge and odd numbers; booleans where numbers go; deep nesting), parsing either gives a
request every store can keep, or refuses it with an InvalidRequest naming the field. No
other exception, ever. The strategies here (`hostile_text`, `odd_values`, `request_data`)
are shared with the batch line tests and the API fuzz (tests/test_fuzz.py).

These run on every `make test` (pure Python, a few seconds); the API-level fuzz is slow."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("hypothesis", reason="dev extra: pip install -e '.[dev]'")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.params import JobParams
from services.core.requests import (
    MAX_INTEGER_DIGITS,
    InvalidJSON,
    InvalidRequest,
    JobRequest,
    OversizedNumber,
    escape_unstorable,
    parse_job_request,
    read_json,
    unstorable,
)
from services.storage.job_rows import request_of, stored_params

MAX_CHARS = 8000
PROPERTY = settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- strategies (shared) ------------------------------------------------------------------

# Characters that have broken text handling somewhere: NUL, lone surrogates (high, low, at
# the edges), bidi overrides and isolates, zero-width and BOM, line and paragraph separators,
# C0/C1 controls, noncharacters, the last code point.
SPECIAL_CHARS = (
    "\x00\ud800\udbff\udc00\udfff\u202e\u202d\u2066\u2067\u2069\u200f\u200b\ufeff"
    "\u2028\u2029\x85\x1b\x7f\x07\r\n\t\ufffe\uffff\U0010ffff\U0001f600\u0301"
)
any_char = st.one_of(
    st.characters(),  # every code point but surrogates
    st.characters(categories=["Cs"]),  # lone surrogates
    st.sampled_from(SPECIAL_CHARS),
)
STORABLE_CHAR = st.one_of(
    st.characters(exclude_characters="\x00", exclude_categories=["Cs"]),
    st.sampled_from([c for c in SPECIAL_CHARS if unstorable(c) is None]),
)
LONG_TEXTS = st.sampled_from(["x", "é", "😀", "\u202e", "\x00", "\ud800", "ab"]).flatmap(
    lambda unit: st.integers(1_000, 20_000).map(lambda n: unit * n)
)


def hostile_text(max_size: int = 60) -> st.SearchStrategy[str]:
    """Arbitrary unicode, lone surrogates and NUL included; now and then very long."""
    return st.one_of(st.text(any_char, max_size=max_size), LONG_TEXTS)


def storable_text(max_size: int = 60) -> st.SearchStrategy[str]:
    """Text every store keeps: anything but NUL and lone surrogates (bidi marks and all)."""
    return st.text(STORABLE_CHAR, max_size=max_size)


odd_numbers = st.one_of(
    st.integers(),
    st.integers(-(2**64), 2**64),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, -(2**63), 10**40, 32768, 32769]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 5.0, 1e308, 5e-324, 1e-320, 2.5]),
    st.integers(MAX_INTEGER_DIGITS + 1, 6_000).map(OversizedNumber),
)
scalars = st.one_of(st.none(), st.booleans(), odd_numbers, hostile_text())
odd_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text(12), inner, max_size=4),
    max_leaves=8,
)

PARAM_NAMES = sorted(JobParams.model_fields)
INT_PARAMS = [
    "executor_max_tokens",
    "llm_max_tokens",
    "seed",
    "drafts",
    "draft_max_tokens",
    "relay_budget",
    "relay_turns",
    "relay_call_tokens",
]
NUMBER_PARAMS = ["temperature", "top_p", "relay_entropy_threshold"]
STRING_PARAMS = {
    "cost_preference": ["quality", "balanced", "economy"],
    "policy": ["entropy", "trained"],
    "relay_mode": ["command", "entropy"],
    "task": ["math", "code", "text"],
}
STRATEGY_NAMES = ["tandem", "llm_only", "slm_only", "scot", "relay", "fixed:100", "fixed:0"]


@st.composite
def valid_params(draw) -> dict[str, Any]:
    """Params the parser must accept."""
    params: dict[str, Any] = {}
    if draw(st.booleans()):
        first = draw(st.integers(0, 100))
        steps = draw(st.lists(st.integers(1, 400), max_size=5))
        params["budgets"] = [first + sum(steps[:i]) for i in range(len(steps) + 1)]
    for name in draw(st.lists(st.sampled_from(INT_PARAMS), max_size=3, unique=True)):
        top = {"seed": 2**32 - 9, "drafts": 8, "relay_turns": 64}.get(name, 32768)
        params[name] = draw(st.integers(0 if name == "seed" else 1, top))
    if draw(st.booleans()):
        params["temperature"] = draw(st.floats(0, 2) | st.integers(0, 2))
    if draw(st.booleans()):
        params["cost_preference"] = draw(
            st.sampled_from(STRING_PARAMS["cost_preference"]) | st.floats(0, 1e6)
        )
    if draw(st.booleans()):
        params["task"] = draw(st.sampled_from(["math", "code", "text"]))
        if params["task"] == "code" and draw(st.booleans()):
            params["entry_point"] = draw(st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True))
    return params


@st.composite
def valid_requests(draw) -> dict[str, Any]:
    question = draw(storable_text(200).filter(lambda q: q.strip()))
    data: dict[str, Any] = {"question": question}
    if draw(st.booleans()):
        data["strategy"] = draw(st.sampled_from(STRATEGY_NAMES))
    if draw(st.booleans()):
        data["params"] = draw(valid_params())
    return data


@st.composite
def request_data(draw) -> Any:
    """Anything a client could send as a request: mostly almost-valid objects with some
    fields hostile, sometimes anything at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(odd_values)
    data = draw(valid_requests())
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
        where = draw(
            st.sampled_from(["question", "strategy", "params", "param", "extra", *["splice"] * 5])
        )
        if where == "splice":  # special characters inside an otherwise valid text field
            field = draw(st.sampled_from(["question", "strategy", "param"]))
            params = data.setdefault("params", {})
            if field == "param" and isinstance(params, dict):
                name = draw(st.sampled_from([*STRING_PARAMS, "entry_point"]))
                target, key = params, name
            else:
                target, key = data, field if field != "param" else "question"
            text = target.get(key) if isinstance(target.get(key), str) else "abc"
            at = draw(st.integers(0, len(text)))
            target[key] = text[:at] + draw(st.text(st.sampled_from(SPECIAL_CHARS), min_size=1, max_size=3)) + text[at:]
        elif where == "param":
            params = data.setdefault("params", {})
            if isinstance(params, dict):
                name = draw(st.sampled_from(PARAM_NAMES) | hostile_text(12))
                params[name] = draw(odd_values)
        elif where == "extra":
            data[draw(hostile_text(12))] = draw(odd_values)
        else:
            data[where] = draw(odd_values)
    return data


# --- helpers ------------------------------------------------------------------------------


def json_text(value: Any, ascii_only: bool = True) -> str:
    """`value` as a client would write it: an OversizedNumber as its digits (a literal
    Python could not even convert)."""
    numbers: list[int] = []

    def swap(item: Any) -> Any:
        if isinstance(item, OversizedNumber):
            numbers.append(item.digits)
            return f"\x01{len(numbers) - 1}\x01"
        if isinstance(item, dict):
            return {key: swap(inner) for key, inner in item.items()}
        if isinstance(item, list | tuple):
            return [swap(inner) for inner in item]
        return item

    text = json.dumps(swap(value), ensure_ascii=ascii_only)
    for index, digits in enumerate(numbers):
        marker = json.dumps(f"\x01{index}\x01", ensure_ascii=ascii_only)
        text = text.replace(marker, "9" * digits, 1)
    return text



def assert_storable(value: Any, where: str = "") -> None:
    """Every string in `value` (keys too) is text Postgres, Redis and the models take."""
    if isinstance(value, str):
        assert unstorable(value) is None, (where, value[:80])
        value.encode("utf-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            assert_storable(key, where)
            assert_storable(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            assert_storable(item, f"{where}[{index}]")
    else:
        assert value is None or type(value) in (bool, int, float), (where, type(value))


def assert_accepted_request_is_sound(request: JobRequest) -> None:
    assert_storable(request.question, "question")
    assert_storable(request.strategy, "strategy")
    stored = stored_params(request.params)
    assert_storable(stored, "params")
    # What a worker reads back from the job's row is the same request.
    row = json.loads(json.dumps(stored, ensure_ascii=False).encode("utf-8"))
    assert request_of(request.question, request.strategy, row) == request
    for name in INT_PARAMS:
        value = getattr(request.params, name)
        assert value is None or type(value) is int, (name, value)
    for name in NUMBER_PARAMS:
        assert type(getattr(request.params, name)) is float, name
    assert all(type(budget) is int for budget in request.params.budgets)


def assert_refusal_is_sound(error: InvalidRequest) -> None:
    message = str(error)
    assert message and len(message) < 20_000
    # A refusal quotes what was sent escaped: the message itself is storable (batch errors).
    assert unstorable(message) is None, message[:200]


# --- properties of parse_job_request ------------------------------------------------------


@PROPERTY
@given(data=request_data())
def test_any_input_is_a_sound_request_or_a_named_refusal(data: Any) -> None:
    try:
        request = parse_job_request(data, MAX_CHARS)
    except InvalidRequest as error:
        assert_refusal_is_sound(error)
    else:
        assert_accepted_request_is_sound(request)


@PROPERTY
@given(data=valid_requests())
def test_valid_requests_are_accepted_as_sent(data: dict[str, Any]) -> None:
    request = parse_job_request(data, MAX_CHARS)
    assert request.question == data["question"]
    assert request.strategy == data.get("strategy", "tandem")
    for name, value in data.get("params", {}).items():
        got = getattr(request.params, name)
        assert got == (tuple(value) if isinstance(value, list) else value), name
    assert_accepted_request_is_sound(request)


@st.composite
def one_bad_field(draw) -> tuple[dict[str, Any], str]:
    """A valid request with exactly one field made wrong, and the name the refusal must
    give (`question`, `strategy`, `params.NAME`)."""
    data = draw(valid_requests())
    field = draw(
        st.sampled_from(["question", "strategy", *(f"params.{n}" for n in PARAM_NAMES)])
    )
    unstorable_text = st.tuples(storable_text(20), st.sampled_from("\x00\ud800\udfff"), storable_text(20)).map("".join)
    if field == "question":
        bad = draw(unstorable_text | st.one_of(st.booleans(), odd_numbers, st.none()))
    elif field == "strategy":
        bad = draw(unstorable_text | st.one_of(st.booleans(), odd_numbers) | hostile_text().filter(lambda s: s not in STRATEGY_NAMES and not s.startswith("fixed:")))
    else:
        name = field.split(".", 1)[1]
        if name in INT_PARAMS:  # strict: booleans, floats and numeric strings are refused
            bad = draw(st.one_of(
                st.booleans(),
                st.floats(allow_nan=True, allow_infinity=True),
                st.integers(0, 500).map(str),
                st.integers(MAX_INTEGER_DIGITS + 1, 5000).map(OversizedNumber),
                st.integers(2**32, 10**30),  # over every limit, seed included
            ))
        elif name in NUMBER_PARAMS:
            bad = draw(st.one_of(st.booleans(), st.sampled_from(["0.5", "1", "nan"]), st.sampled_from([float("nan"), float("inf"), -1.0, 1e9])))
        elif name == "budgets":
            bad = draw(st.one_of(
                st.just([0, True]), st.just([0, 1.0]), st.just(["0"]), st.just([]),
                st.just([5, 5]), st.just([-1]), st.just("0,100"), st.just(list(range(9))),
            ))
        elif name == "entry_point":
            data.setdefault("params", {})["task"] = "code"
            data["params"].pop("entry_point", None)
            bad = draw(unstorable_text | st.sampled_from(["1x", "class", "a b", ""]) | st.integers())
        else:
            allowed = STRING_PARAMS[name]
            bad = draw(st.one_of(st.booleans(), odd_numbers.filter(lambda v: name != "cost_preference" or not (isinstance(v, float | int) and 0 <= v <= 1e6)), unstorable_text, st.sampled_from([a.upper() for a in allowed])))
        params = dict(data.get("params", {}))
        params[name] = bad
        data = {**data, "params": params}
        return data, field
    return {**data, field: bad}, field


@PROPERTY
@given(case=one_bad_field())
def test_one_bad_field_is_refused_by_its_name(case: tuple[dict[str, Any], str]) -> None:
    data, field = case
    with pytest.raises(InvalidRequest) as raised:
        parse_job_request(data, MAX_CHARS)
    message = str(raised.value)
    assert message.startswith(f"{field}:") or message.startswith(f"{field}."), message
    assert_refusal_is_sound(raised.value)


@pytest.mark.parametrize("name", INT_PARAMS)
@pytest.mark.parametrize(
    ("value", "got"),
    [
        (True, "got a boolean (true)"),
        (False, "got a boolean (false)"),
        (5.0, "got a number with a decimal point or exponent (5.0)"),
        ("5", "got a string ('5')"),
        (OversizedNumber(5000), "got a number too long to be any parameter"),
    ],
)
def test_integer_params_are_strict_and_say_what_was_expected(name: str, value, got: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_job_request({"question": "q", "params": {name: value}}, MAX_CHARS)
    assert str(raised.value) == f"params.{name}: Input should be a valid integer; {got}"


@pytest.mark.parametrize("name", NUMBER_PARAMS)
def test_number_params_take_integers_but_not_booleans_or_strings(name: str) -> None:
    assert getattr(parse_job_request({"question": "q", "params": {name: 1}}, 9).params, name) == 1.0
    for value, got in ((True, "a boolean (true)"), ("0.5", "a string ('0.5')")):
        with pytest.raises(InvalidRequest) as raised:
            parse_job_request({"question": "q", "params": {name: value}}, MAX_CHARS)
        assert str(raised.value) == f"params.{name}: Input should be a valid number; got {got}"


def test_the_issue_cases() -> None:
    """The inputs issue 19 found: each is a named 422-style refusal now."""
    cases = {
        b'{"question": "a \\ud800 b"}': "question: contains an unpaired UTF-16 surrogate (U+D800",
        b'{"question": "a \\u0000 b"}': "question: contains a NUL character (U+0000",
        b'{"question": "a", "params": {"seed": ' + b"1" * 5000 + b"}}": "params.seed: ",
        b'{"question": "a", "params": {"executor_max_tokens": true}}': "params.executor_max_tokens: ",
        b'{"question": "a", "params": {"\\ud800": 1}}': "params: a field name contains an unpaired",
        b'{"question": "a", "params": {"task": "code", "entry_point": "f\\u0000"}}': "params.entry_point: contains a NUL",
    }
    for body, fragment in cases.items():
        with pytest.raises(InvalidRequest) as raised:
            parse_job_request(read_json(body), MAX_CHARS)
        assert str(raised.value).startswith(fragment), (body[:60], str(raised.value))


# --- properties of read_json ---------------------------------------------------------------


@PROPERTY
@given(raw=st.one_of(st.binary(max_size=300), hostile_text(300)))
def test_read_json_refuses_anything_that_is_not_json_with_invalid_json(raw) -> None:
    try:
        read_json(raw)
    except InvalidJSON as error:
        assert str(error)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | hostile_text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text(10), inner, max_size=4),
    max_leaves=10,
)


@PROPERTY
@given(value=json_values, ascii_only=st.booleans())
def test_read_json_reads_what_json_wrote(value, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert read_json(text) == value
    if ascii_only:
        assert read_json(text.encode()) == value


@PROPERTY
@given(digits=st.integers(1, 20_000), sign=st.sampled_from(["", "-"]), key=hostile_text(8))
def test_long_integer_literals_never_reach_int(digits: int, sign: str, key: str) -> None:
    text = "{" + json.dumps(key) + ": " + sign + "7" * digits + "}"
    value = read_json(text)[key]
    if digits > MAX_INTEGER_DIGITS:
        assert isinstance(value, OversizedNumber) and value.digits == digits
    else:
        assert value == int(sign + "7" * digits)


@pytest.mark.parametrize("depth", [1_000, 50_000, 1_000_000])
@pytest.mark.parametrize("bracket", ["[]", "{}"])
def test_deep_nesting_is_invalid_json_not_a_crash(depth: int, bracket: str) -> None:
    opening, closing = bracket
    inner = '"a":' if opening == "{" else ""
    raw = (opening + inner) * depth + "1" + closing * depth
    try:
        value = read_json(raw)
    except InvalidJSON as error:
        assert "nested too deeply" in str(error) or str(error)
    else:  # a parser with room for it: then the request parser refuses it by field
        with pytest.raises(InvalidRequest):
            parse_job_request({"question": "q", "params": value}, MAX_CHARS)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(constant: str) -> None:
    with pytest.raises(InvalidJSON, match=f"{constant} is not a JSON value"):
        read_json('{"question": "q", "params": {"temperature": ' + constant + "}}")


# --- unstorable text -------------------------------------------------------------------------


@PROPERTY
@given(text=hostile_text(200))
def test_unstorable_is_exactly_what_utf8_or_postgres_cannot_take(text: str) -> None:
    try:
        text.encode("utf-8")
        encodable = True
    except UnicodeEncodeError:
        encodable = False
    assert (unstorable(text) is None) == (encodable and "\x00" not in text)
    escaped = escape_unstorable(text)
    assert unstorable(escaped) is None
    if unstorable(text) is None:
        assert escaped == text
