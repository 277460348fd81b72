"""Hostile input against the REST API (the Flask app over WSGI, real Postgres and Redis, a
database of its own): a property-based fuzz of every operation in /openapi.json with
schemathesis, fuzzed JSONL batch lines, SQL-looking and oversized strings in every place a
client can put one, and other owners' ids. The bar: never a 5xx, always a problem body
that says what was wrong."""

from __future__ import annotations

import json
import string
import uuid
from collections import Counter
from collections.abc import Iterator
from urllib.parse import quote

import pytest

pytest.importorskip("hypothesis", reason="dev extra: pip install -e '.[dev]'")

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

pytestmark = pytest.mark.slow

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
SQLISH = [
    "' OR '1'='1",
    "'; DROP TABLE jobs; --",
    '" OR ""="',
    "1; SELECT pg_sleep(10); --",
    "job_x' UNION SELECT key_hash, owner FROM api_keys --",
    "%' AND 1=0 UNION ALL SELECT NULL --",
    "\\'; TRUNCATE stages CASCADE; --",
    "$$; DELETE FROM jobs; $$",
]
ODD = [
    "../../etc/passwd",
    "%00",
    "\u202e\u0000\ufeff",
    "😀" * 50,
    "<script>alert(1)</script>",
    "{{7*7}}",
    " ",
    "\r\nX-Injected: 1",
]
HUGE = ["x" * 100_000, "é" * 20_000, "1" * 5000]


@pytest.fixture(scope="module")
def fuzz_db(postgres_admin_url: str) -> Iterator[str]:
    from services.storage.db import upgrade
    from tests import infra

    with infra.scratch_database(postgres_admin_url) as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="module")
def app(in_process_settings, fuzz_db: str):
    """The API on a database of its own; tasks are collected, never queued (no workers)."""
    from services.api import create_app

    queued: list = []
    config = in_process_settings.model_copy(
        update={"database_url": fuzz_db, "rate_limit_per_minute": 0}
    )
    application = create_app(config, enqueue=queued.extend)
    application.config["TESTING"] = False  # errors go through the problem handlers
    return application


def new_key(database_url: str, owner: str) -> str:
    from services.api.auth import create_key
    from services.storage.db import transaction

    with transaction(database_url) as session:
        return create_key(session, owner)


@pytest.fixture(scope="module")
def keys(fuzz_db: str) -> dict[str, str]:
    return {"alice": new_key(fuzz_db, "alice"), "mallory": new_key(fuzz_db, "mallory")}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_problem(response, *statuses: int) -> dict:
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    if statuses:
        assert response.status_code in statuses, response.get_data(as_text=True)[:500]
    body = response.get_json(silent=True)
    if response.status_code >= 400:
        assert response.mimetype == "application/problem+json", response.mimetype
        assert body["status"] == response.status_code and body["detail"]
        assert "Traceback" not in response.get_data(as_text=True)
    return body


# --- schemathesis over the OpenAPI document ---------------------------------------------


def test_openapi_fuzz_every_operation_no_server_error(app, keys) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    headers = auth(keys["alice"])
    requests: Counter = Counter()
    statuses: Counter = Counter()
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9

    def fuzz(operation, mode) -> None:
        @settings(
            max_examples=30,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            case.headers = {**(case.headers or {}), **headers}  # a valid key: fuzz past auth
            response = case.call()
            requests[operation.label] += 1
            statuses[response.status_code] += 1
            case.validate_response(response, checks=[not_a_server_error], headers=headers)

        run()

    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                fuzz(operation, mode)
            except Unsatisfiable:  # no invalid input exists (an operation without inputs)
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
            except Exception as error:
                failures.append(f"{operation.label} ({mode.value}): {str(error)[:800]}")
    total = sum(requests.values())
    print(f"\nschemathesis: {total} requests over {len(operations)} operations; {dict(statuses)}")
    print("  by operation: " + ", ".join(f"{op} {n}" for op, n in sorted(requests.items())))
    assert not failures, "\n\n".join(failures)
    assert not [code for code in statuses if code >= 500]
    assert total >= 10 * len(operations)


# --- fuzzed JSONL batch lines -----------------------------------------------------------

_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\n\r"),
    min_size=1,
    max_size=120,
)


@st.composite
def batch_line(draw) -> tuple[bytes, str]:
    """A line and what it is: 'valid', 'invalid' or 'blank'."""
    kind = draw(
        st.sampled_from(
            ["valid", "sql", "json", "object", "bytes", "broken", "long_q", "huge", "deep", "bad"]
        )
    )
    custom_id = f"c{uuid.uuid4().hex[:12]}"
    if kind in ("valid", "sql"):
        question = "Q " + (draw(st.sampled_from(SQLISH)) if kind == "sql" else draw(_text))
        line = {"custom_id": custom_id, "question": question}
        if draw(st.booleans()):
            line["strategy"] = "slm_only"
            line["params"] = {"executor_max_tokens": draw(st.integers(1, 64))}
        return json.dumps(line, ensure_ascii=draw(st.booleans())).encode(), "valid"
    if kind == "json":  # any JSON that is not an object
        value = draw(
            st.recursive(
                st.none() | st.booleans() | st.floats(allow_nan=False) | _text,
                lambda inner: st.lists(inner, max_size=3),
                max_leaves=5,
            )
        )
        return json.dumps(value).encode(), "invalid"
    if kind == "object":  # an object without a custom_id, or with junk fields
        value = draw(st.dictionaries(_text.filter(lambda k: k != "custom_id"), _text, max_size=4))
        return json.dumps(value).encode(), "invalid"
    if kind == "bytes":
        raw = draw(st.binary(max_size=200)).replace(b"\n", b"")
        raw = b"\xff" + raw  # never UTF-8: invalid however it goes on
        return raw, "invalid"
    if kind == "broken":
        return b'{"custom_id": "' + draw(_text).encode() + b'", "question": ', "invalid"
    if kind == "long_q":  # over TANDEM_MAX_QUESTION_CHARS
        return json.dumps({"custom_id": custom_id, "question": "y" * 8001}).encode(), "invalid"
    if kind == "deep":  # nested past any parser's recursion limit, within the line limit
        depth = draw(st.integers(2_000, 20_000))
        return b'{"custom_id": "d", "question": ' + b"[" * depth + b"]" * depth + b"}", "invalid"
    if kind == "huge":  # over the 64 KiB line limit
        return json.dumps({"custom_id": custom_id, "question": "z" * 70_000}).encode(), "invalid"
    bad = draw(
        st.sampled_from(
            [
                {"custom_id": custom_id, "question": QUESTION, "strategy": "'; DROP TABLE x;--"},
                {"custom_id": custom_id, "question": QUESTION, "params": {"budgets": "1 OR 1"}},
                {"custom_id": custom_id, "question": "nul \x00 inside"},
                {"custom_id": "x" * 300, "question": QUESTION},
                {"custom_id": 7, "question": QUESTION},
                {"custom_id": custom_id, "question": QUESTION, "params": ["no"]},
                {"custom_id": custom_id, "question": ""},
            ]
        )
    )
    return json.dumps(bad).encode(), "invalid"


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
@given(lines=st.lists(batch_line(), min_size=1, max_size=25), crlf=st.booleans())
def _batch_property(client, key: str, lines, crlf: bool, seen: Counter) -> None:
    body = (b"\r\n" if crlf else b"\n").join(line for line, _ in lines) + b"\n"
    response = client.post(
        "/v1/batches", data=body, headers={**auth(key), "Content-Type": "application/jsonl"}
    )
    seen[response.status_code] += 1
    valid = [n for n, (_, kind) in enumerate(lines, 1) if kind == "valid"]
    invalid = [n for n, (_, kind) in enumerate(lines, 1) if kind == "invalid"]
    if not valid:
        problem = assert_problem(response, 422)
        assert "no valid line" in problem["detail"]
        assert {e["line"] for e in problem["errors"]} == set(invalid[:20])
        return
    batch = assert_problem(response, 202)
    assert batch["lines"] == {
        "total": len(lines),
        "valid": len(valid),
        "invalid": len(invalid),
    }
    reported = {error["line"]: error["error"] for error in batch["errors"]}
    assert set(reported) == set(invalid)
    assert all(reported.values())


def test_fuzzed_batch_lines_never_5xx_and_report_each_bad_line(app, keys) -> None:
    seen: Counter = Counter()
    client = app.test_client()
    _batch_property(client, keys["alice"], seen=seen)
    print(f"\nbatch fuzz: {sum(seen.values())} uploads; {dict(seen)}")
    assert seen[202] and not [code for code in seen if code >= 500]


# --- hostile strings in every field -------------------------------------------------------


@pytest.mark.parametrize("value", SQLISH + ODD + HUGE)
def test_hostile_strings_everywhere(app, keys, fuzz_db: str, value: str) -> None:
    client = app.test_client()
    headers = auth(keys["alice"])
    # As a question: accepted verbatim or refused with a reason.
    response = client.post("/v1/jobs", json={"question": value}, headers=headers)
    body = assert_problem(response, 202, 422)
    if response.status_code == 202:
        read = client.get(body["status_url"], headers=headers).get_json()
        assert read["question"] == value
    # As an id in the path, and as every query parameter.
    quoted = quote(value, safe="")
    for path in (f"/v1/jobs/{quoted}", f"/v1/jobs/{quoted}/cancel", f"/v1/batches/{quoted}"):
        method = client.post if path.endswith("/cancel") else client.get
        # (422 where Postgres cannot even compare the id: a NUL in a batch id)
        assert_problem(method(path, headers=headers), 404, *([422] if "\x00" in value else []))
    for name in ("status", "strategy", "batch_id", "cursor", "limit"):
        response = client.get(f"/v1/jobs?{name}={quoted}", headers=headers)
        assert_problem(response, 200, 400, *([422] if "\x00" in value else []))
    for name in ("strategy", "params"):
        response = client.post(
            f"/v1/batches?{name}={quoted}",
            data=json.dumps({"custom_id": "a", "question": QUESTION}),
            headers={**headers, "Content-Type": "application/jsonl"},
        )
        assert_problem(response, 202, 400, 422)
    # As an idempotency key: the same key twice is the same job, or refused with a reason.
    keyed = {**headers, "Idempotency-Key": value}
    try:
        first = client.post("/v1/jobs", json={"question": QUESTION}, headers=keyed)
    except ValueError:  # not a header value at all (CR/LF): the client refuses to send it
        assert "\n" in value
    else:
        assert_problem(first, 202, 400, *([422] if "\x00" in value else []))
        if first.status_code == 202:
            again = client.post("/v1/jobs", json={"question": QUESTION}, headers=keyed)
            assert again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]
    # As a bearer key: 401, not a query gone wrong.
    if "\n" not in value:
        assert_problem(client.get("/v1/jobs", headers={"Authorization": f"Bearer {value}"}), 401)
    # The tables are all still there.
    from sqlalchemy import text

    from services.storage.db import transaction

    with transaction(fuzz_db) as session:
        for table in ("jobs", "stages", "batches", "api_keys"):
            session.execute(text(f"SELECT 1 FROM {table} LIMIT 1"))


def test_control_characters_in_a_question(app, keys) -> None:
    """Postgres cannot store NUL in text: such a question is refused as the client's error,
    never reported as the database being down."""
    client = app.test_client()
    for question in ("nul \x00 inside", "\x00", "bell \x07 and escape \x1b[31m red"):
        response = client.post("/v1/jobs", json={"question": question}, headers=auth(keys["alice"]))
        assert_problem(response, 202, 422)


def test_random_bodies_and_content_types(app, keys) -> None:
    client = app.test_client()
    headers = auth(keys["alice"])
    bodies = [b"", b"\xff\xfe", b"null", b"[]", b"{", b'{"question": 1e999}', b"\x00" * 100]
    bodies += [b'{"question": "' + b"x" * 70_000 + b'"}', json.dumps({"q": SQLISH}).encode()]
    bodies += [b'{"question": "a", "params": {"seed": 1' + b"0" * 400 + b"}}"]
    bodies += [b'{"question": "a", "params": {"budgets": [' + b"1," * 5000 + b"2]}}"]
    for body in bodies:
        for kind in ("application/json", "text/plain", "application/jsonl", "multipart/form-data"):
            response = client.post("/v1/jobs", data=body, headers={**headers, "Content-Type": kind})
            # (202: a 400-digit seed is a valid JSON integer; the job stores it as sent.)
            assert_problem(response, 202, 400, 413, 415, 422)
            response = client.post(
                "/v1/batches", data=body, headers={**headers, "Content-Type": kind}
            )
            assert_problem(response, 202, 400, 413, 415, 422)


def test_deeply_nested_json_is_refused_cleanly(app, keys) -> None:
    client = app.test_client()
    deep = b'{"question": "a", "params": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    response = client.post(
        "/v1/jobs", data=deep, headers={**auth(keys["alice"]), "Content-Type": "application/json"}
    )
    assert_problem(response, 400, 422)


# --- other owners' ids ----------------------------------------------------------------------


def test_another_owners_ids_are_404_everywhere(app, keys) -> None:
    client = app.test_client()
    alice, mallory = auth(keys["alice"]), auth(keys["mallory"])
    job = client.post("/v1/jobs", json={"question": QUESTION}, headers=alice).get_json()
    batch = client.post(
        "/v1/batches",
        data=json.dumps({"custom_id": "one", "question": QUESTION}),
        headers={**alice, "Content-Type": "application/jsonl"},
    ).get_json()
    for method, path in [
        ("get", f"/v1/jobs/{job['id']}"),
        ("post", f"/v1/jobs/{job['id']}/cancel"),
        ("get", f"/v1/batches/{batch['id']}"),
        ("get", f"/v1/batches/{batch['id']}/results"),
        ("post", f"/v1/batches/{batch['id']}/cancel"),
        ("get", f"/v1/dashboard/jobs/{job['id']}"),
    ]:
        response = getattr(client, method)(path, headers=mallory)
        problem = assert_problem(response, 404)
        assert job["id"] not in json.dumps(problem) or "no job" in problem["detail"]
    listed = client.get(f"/v1/jobs?batch_id={batch['id']}&limit=200", headers=mallory).get_json()
    assert listed["data"] == []
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).status_code == 200
    # A guessed id of the same shape is as unknown as another owner's.
    guessed = "job_" + "".join(string.ascii_lowercase[i % 26] for i in range(len(job["id"]) - 4))
    assert_problem(client.get(f"/v1/jobs/{guessed}", headers=alice), 404)
