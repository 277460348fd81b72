"""Batches: JSONL uploads over REST against real Postgres and Redis. The fast tests use the
in-process API with a recording enqueue (no workers); the slow ones run the real stack
(API, Celery workers, reconciler) on a Redis this test can restart."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from flask.testing import FlaskClient

from tests import infra

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
JSONL = {"Content-Type": "application/jsonl"}
CHEAP = {"executor_max_tokens": 1}


class Recorder:
    """An enqueue that keeps what it was given (thread-safe: the feeder runs in a thread)."""

    def __init__(self) -> None:
        self.tasks: list = []
        self.lock = threading.Lock()

    def __call__(self, tasks) -> None:
        with self.lock:
            self.tasks.extend(tasks)

    def job_ids(self) -> set[str]:
        with self.lock:
            return {task.job_id for task in self.tasks}


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def client(in_process_settings, recorder: Recorder) -> FlaskClient:
    from services.api import create_app

    return create_app(in_process_settings, enqueue=recorder).test_client()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def problem(response, status: int, fragment: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert fragment in body["detail"], body["detail"]
    return body


def jsonl(*lines: object) -> str:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)


def line(custom_id: str, question: str = QUESTION, **extra) -> dict:
    return {"custom_id": custom_id, "question": question, **extra}


def upload(client: FlaskClient, key: str, body: str, query: str = "", **headers):
    return client.post(f"/v1/batches{query}", data=body, headers={**auth(key), **JSONL, **headers})


def results(client: FlaskClient, key: str, batch_id: str) -> list[dict]:
    response = client.get(f"/v1/batches/{batch_id}/results", headers=auth(key))
    assert response.status_code == 200 and response.mimetype == "application/jsonl"
    return [json.loads(text) for text in response.get_data(as_text=True).splitlines()]


def wait_until(check, timeout: float = 30, what: str = "condition") -> None:
    infra.wait_for(check, timeout, what, interval=0.05)


MALFORMED = [
    ("{not json", "not valid JSON"),
    (json.dumps({"custom_id": "no-question"}), "question: Field required"),
    (json.dumps(line("bad-strategy", strategy="nope")), "unknown strategy"),
    (json.dumps(line("a")), "duplicate custom_id 'a' (first used on line 1)"),
    (json.dumps(line("long", "x" * 70_000)), "line is longer than the limit of 65536 bytes"),
    (json.dumps([1, 2]), "a line must be a JSON object"),
    (json.dumps({"question": QUESTION}), "custom_id must be a string"),
    (json.dumps(line("extra", colour="red")), "unknown field(s): colour"),
    (json.dumps(line("params", params={"budgets": [5, 1]})), "strictly increasing"),
    (json.dumps(line("empty", "  ")), "question is empty"),
]


def test_upload_reports_invalid_lines_and_results_keep_input_order(
    client: FlaskClient, api_key: str, recorder: Recorder
) -> None:
    body = [json.dumps(line("a"))]
    for index, (bad, _) in enumerate(MALFORMED):
        body += [bad, json.dumps(line(f"ok-{index}")), ""]  # blank lines are ignored
    response = upload(client, api_key, "\r\n".join(body), "?strategy=slm_only")
    assert response.status_code == 202, response.get_data(as_text=True)
    batch = response.get_json()
    assert response.headers["Location"] == batch["status_url"]
    assert batch["status"] == "in_progress"
    assert batch["lines"] == {"total": 21, "valid": 11, "invalid": 10}
    bad_lines = [2 + 3 * index for index in range(len(MALFORMED))]
    assert [e["line"] for e in batch["errors"]] == bad_lines
    for error, (_, reason) in zip(batch["errors"], MALFORMED, strict=True):
        assert reason in error["error"], error

    job_ids = set()
    wait_until(lambda: len(_batch_jobs(recorder, client, api_key, batch["id"], job_ids)) == 11)
    rows = results(client, api_key, batch["id"])
    assert [r["line"] for r in rows] == sorted([1, *bad_lines, *[3 + 3 * i for i in range(10)]])
    assert [r["status"] for r in rows if r["line"] in bad_lines] == ["invalid"] * 10
    valid = [r for r in rows if r["status"] != "invalid"]
    assert [r["custom_id"] for r in valid] == ["a", *[f"ok-{i}" for i in range(10)]]
    assert {r["status"] for r in valid} == {"queued"} and {r["job_id"] for r in valid} == job_ids
    assert rows[1]["custom_id"] is None and rows[5]["custom_id"] == "bad-strategy"

    read = client.get(batch["status_url"], headers=auth(api_key)).get_json()
    assert read["counts"]["queued"] == 11 and read["counts"]["invalid"] == 10
    assert read["request_counts"] == {
        "total": 21,
        "completed": 0,
        "failed": 10,
        "cancelled": 0,
        "pending": 11,
    }
    assert read["fed_through_line"] == 30 and read["cost"]["tflops"] == 0


def _batch_jobs(recorder, client, key, batch_id, into: set) -> set:
    jobs = client.get(f"/v1/jobs?batch_id={batch_id}&limit=200", headers=auth(key)).get_json()
    into.clear()
    into.update(job["id"] for job in jobs["data"])
    return into & recorder.job_ids()


def test_defaults_from_the_query_and_per_line_overrides(client: FlaskClient, api_key: str) -> None:
    params = json.dumps({"executor_max_tokens": 7, "temperature": 0.5})
    body = jsonl(line("plain"), line("own", strategy="fixed:9", params={"executor_max_tokens": 3}))
    response = upload(client, api_key, body, f"?strategy=slm_only&params={params}")
    assert response.status_code == 202
    batch = response.get_json()
    assert batch["strategy"] == "slm_only"
    assert batch["params"] == {"executor_max_tokens": 7, "temperature": 0.5}
    jobs = client.get(f"/v1/jobs?batch_id={batch['id']}", headers=auth(api_key)).get_json()
    by_id = {job["custom_id"]: job for job in jobs["data"]}
    assert by_id["plain"]["strategy"] == "slm_only"
    assert by_id["plain"]["params"] == {"executor_max_tokens": 7, "temperature": 0.5}
    assert by_id["own"]["strategy"] == "fixed:9"
    assert by_id["own"]["params"] == {"executor_max_tokens": 3, "temperature": 0.5}


def test_text_survives_the_copy(client: FlaskClient, api_key: str) -> None:
    tricky = 'Tab\there, new\nline, CR\r, back\\slash \\N, quote ", é 漢字 🙂'
    body = jsonl(line("a\\b\tc", tricky, params={"seed": 7}))
    batch = upload(client, api_key, body).get_json()
    (row,) = results(client, api_key, batch["id"])
    assert row["custom_id"] == "a\\b\tc"
    job = client.get(f"/v1/jobs/{row['job_id']}", headers=auth(api_key)).get_json()
    assert job["question"] == tricky and job["params"] == {"seed": 7}


@pytest.fixture(scope="module")
def tight_client(in_process_settings, recorder: Recorder) -> FlaskClient:
    from services.api import create_app
    from services.batches import Limits

    settings = in_process_settings.model_copy(update={"max_body_bytes": 4096})
    app = create_app(settings, enqueue=recorder)
    app.config["TANDEM_BATCH_LIMITS"] = Limits(max_lines=5, max_line_bytes=300, max_invalid_lines=2)
    return app.test_client()


def test_limits_give_clear_4xx(tight_client: FlaskClient, api_key: str) -> None:
    c, key = tight_client, api_key
    too_many = problem(upload(c, key, jsonl(*[line(str(i)) for i in range(6)])), 413, "limit is 5")
    assert too_many["batch_id"]
    status = c.get(f"/v1/batches/{too_many['batch_id']}", headers=auth(key)).get_json()
    assert status["status"] == "failed" and "too many lines" in status["failure"]
    problem(upload(c, key, jsonl(line("a"), "x", "y", "z")), 422, "more than 2 invalid lines")
    big = jsonl(*[line(str(i), "q" * 200) for i in range(30)])
    problem(upload(c, key, big), 413, "limit is 4096 bytes")
    # A line over the line limit is one invalid line; the rest of the batch goes on.
    over = upload(c, key, jsonl(line("long", "q" * 400), line("short")))
    assert over.status_code == 202
    assert over.get_json()["errors"][0] == {
        "line": 1,
        "custom_id": None,
        "error": "line is longer than the limit of 300 bytes",
    }


def test_uploads_without_a_valid_line_fail(client: FlaskClient, api_key: str) -> None:
    rejected = problem(upload(client, api_key, jsonl("nope", {"a": 1})), 422, "no valid line")
    assert [e["line"] for e in rejected["errors"]] == [1, 2]
    stored = client.get(f"/v1/batches/{rejected['batch_id']}", headers=auth(api_key)).get_json()
    assert stored["status"] == "failed" and stored["lines"]["invalid"] == 2
    problem(upload(client, api_key, "\n\n  \n"), 422, "no lines")
    problem(upload(client, api_key, ""), 422, "no lines")


@pytest.mark.parametrize(
    ("query", "headers", "status", "fragment"),
    [
        ("", {"Content-Type": "application/json"}, 415, "application/jsonl"),
        ("?strategy=nope", {}, 422, "batch defaults: strategy: unknown strategy"),
        ("?params={", {}, 422, "params is not valid JSON"),
        ("?params=[1]", {}, 422, "params must be a JSON object"),
        ('?params={"colour":1}', {}, 422, "params.colour: unknown field"),
        ("?priority=1", {}, 400, "unknown query parameter"),
    ],
)
def test_bad_uploads(
    client: FlaskClient, api_key: str, query: str, headers: dict, status: int, fragment: str
) -> None:
    problem(upload(client, api_key, jsonl(line("a")), query, **headers), status, fragment)


@pytest.mark.parametrize("kind", ["application/x-ndjson", "text/plain; charset=utf-8"])
def test_other_content_types(client: FlaskClient, api_key: str, kind: str) -> None:
    response = upload(client, api_key, jsonl(line("a")), **{"Content-Type": kind})
    assert response.status_code == 202


def test_owner_isolation(client: FlaskClient, api_key: str, other_key: str) -> None:
    batch = upload(client, api_key, jsonl(line("mine"))).get_json()
    for method, path in [
        ("get", ""),
        ("get", "/results"),
        ("post", "/cancel"),
    ]:
        response = getattr(client, method)(
            f"/v1/batches/{batch['id']}{path}", headers=auth(other_key)
        )
        problem(response, 404, "no batch")
    listed = client.get("/v1/batches?limit=200", headers=auth(other_key)).get_json()["data"]
    assert batch["id"] not in {b["id"] for b in listed}
    problem(client.get("/v1/batches/" + "x" * 300, headers=auth(api_key)), 404, "no batch")
    problem(client.get("/v1/batches"), 401, "missing API key")


def test_list_with_cursor_pagination(client: FlaskClient, api_key: str) -> None:
    ids = [upload(client, api_key, jsonl(line(str(i)))).get_json()["id"] for i in range(3)]
    seen, cursor = [], None
    while True:
        url = "/v1/batches?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=auth(api_key)).get_json()
        seen += [b["id"] for b in page["data"]]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            break
    assert [i for i in seen if i in ids] == list(reversed(ids))
    problem(client.get("/v1/batches?status=done", headers=auth(api_key)), 400, "status")
    problem(client.get("/v1/batches?cursor=%%", headers=auth(api_key)), 400, "cursor")


def test_an_upload_repeated_with_its_idempotency_key_returns_the_first_batch(
    client: FlaskClient, api_key: str, other_key: str, recorder: Recorder
) -> None:
    body = jsonl(line("a"), line("b"))
    first = upload(client, api_key, body, **{"Idempotency-Key": "nightly-2026-11-22"})
    assert first.status_code == 202
    batch_id, job_ids = first.get_json()["id"], set()
    wait_until(lambda: len(_batch_jobs(recorder, client, api_key, batch_id, job_ids)) == 2)
    again = upload(client, api_key, body, **{"Idempotency-Key": "nightly-2026-11-22"})
    assert again.status_code == 200, again.get_data(as_text=True)
    assert again.get_json()["id"] == batch_id and again.get_json()["lines"]["total"] == 2
    time.sleep(0.2)
    assert _batch_jobs(recorder, client, api_key, batch_id, set()) == job_ids  # not twice
    listed = client.get("/v1/batches?limit=200", headers=auth(api_key)).get_json()["data"]
    assert [b["id"] for b in listed].count(batch_id) == 1
    # The key is the owner's: another owner's upload with it is a batch of its own.
    theirs = upload(client, other_key, body, **{"Idempotency-Key": "nightly-2026-11-22"})
    assert theirs.status_code == 202 and theirs.get_json()["id"] != batch_id
    long_key = {"Idempotency-Key": "k" * 201}
    problem(upload(client, api_key, body, **long_key), 400, "Idempotency-Key")


def test_an_idempotency_key_whose_upload_broke_off_can_be_used_again(
    in_process_settings, client: FlaskClient, api_key: str
) -> None:
    from services import batches
    from services.storage.db import transaction
    from services.storage.models import Batch

    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
            raise ConnectionResetError("the client went away")

    url = in_process_settings.database_url
    defaults = batches.parse_defaults("slm_only", None, 8000)
    with pytest.raises(ConnectionResetError):
        batches.ingest(url, "broken-upload", Broken(), defaults, 8000, idempotency_key="k1")
    body = io.BytesIO(jsonl(line("a")).encode())
    batch, created = batches.ingest(
        url, "broken-upload", body, defaults, 8000, idempotency_key="k1"
    )
    assert created and batch.status == "in_progress" and batch.total_lines == 1
    # A batch that was read to the end keeps its key.
    body = io.BytesIO(jsonl(line("b")).encode())
    again, created = batches.ingest(
        url, "broken-upload", body, defaults, 8000, idempotency_key="k1"
    )
    assert not created and again.id == batch.id
    with transaction(url) as session:  # leave nothing for other tests' feeders
        batches.cancel(session, session.get_one(Batch, batch.id, with_for_update=True))


def test_an_idempotency_key_still_uploading_is_a_conflict(
    in_process_settings, client: FlaskClient, api_key: str
) -> None:
    from services.storage.db import transaction
    from services.storage.models import Batch

    with transaction(in_process_settings.database_url) as session:  # an upload in flight
        session.add(Batch(owner="alice", status="validating", idempotency_key="in-flight"))
    response = upload(client, api_key, jsonl(line("a")), **{"Idempotency-Key": "in-flight"})
    body = problem(response, 409, "still being read")
    assert response.headers["Retry-After"] and body["batch_id"]


def test_the_cli_retries_an_upload_whose_reply_was_lost(
    in_process_settings, client: FlaskClient, api_key: str, tmp_path: Path
) -> None:
    """`tandem batch submit` against the real API, over a transport that loses the first
    reply after the API has stored the batch: the retry gets that batch, not a second."""
    from sqlalchemy import func, select

    from services.batch_cli import _upload
    from services.storage.db import transaction
    from services.storage.models import Batch

    class LosesFirstReply(httpx.WSGITransport):
        replies = 0

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = super().handle_request(request)
            self.replies += 1
            if self.replies == 1:
                raise httpx.ReadError("connection reset before the reply", request=request)
            return response

    def batches_of_alice() -> int:
        with transaction(in_process_settings.database_url) as session:
            return session.scalar(select(func.count()).where(Batch.owner == "alice"))

    source = tmp_path / "retried.jsonl"
    source.write_text(jsonl(line("r1"), line("r2")))
    before = batches_of_alice()
    transport = LosesFirstReply(app=client.application)
    with httpx.Client(transport=transport, base_url="http://api", headers=auth(api_key)) as http:
        headers = {"Content-Type": "application/jsonl", "Idempotency-Key": "retried-upload"}
        created = _upload(http, source, {"strategy": "slm_only"}, headers)
    assert transport.replies == 2 and created["lines"]["total"] == 2
    assert batches_of_alice() == before + 1


def _finish(database_url: str, batch_id: str, lines: dict[int, str]) -> None:
    """Play the workers: give jobs of the batch (by line) a final status and a stage."""
    from sqlalchemy import select

    from services.core.steps import Outcome, StageRecord
    from services.storage import job_rows, stage_rows
    from services.storage.db import transaction
    from services.storage.models import Job

    with transaction(database_url) as session:
        jobs = session.scalars(select(Job).where(Job.batch_id == batch_id))
        for job in jobs:
            status = lines.get(job.line)
            if status is None:
                continue
            if status == "running":
                job.status = "running"
                continue
            record = StageRecord(
                seq=0,
                kind="executor",
                role="executor",
                model="m",
                prompt_tokens=10,
                generated_tokens=2,
                tflops=0.5,
            )
            stage_rows.add_stage(session, job.id, record)
            if status == "succeeded":
                job_rows.mark_succeeded(session, job.id, Outcome(answer="7", final_text="7", summary={}))
            else:
                job_rows.mark_failed(session, job.id, "model fell over")


def test_completion_freezes_counts_and_cost(
    client: FlaskClient, api_key: str, in_process_settings
) -> None:
    batch = upload(client, api_key, jsonl(line("a"), "bad", line("b"), line("c"))).get_json()
    _finish(in_process_settings.database_url, batch["id"], {1: "succeeded", 3: "failed"})
    running = client.get(batch["status_url"], headers=auth(api_key)).get_json()
    assert running["status"] == "in_progress" and running["eta_s"] is not None
    assert running["cost"]["tflops"] == 1 and running["cost"]["generated_tokens"] == 4
    _finish(in_process_settings.database_url, batch["id"], {4: "succeeded"})
    done = client.get(batch["status_url"], headers=auth(api_key)).get_json()
    assert done["status"] == "completed" and done["finished_at"]
    assert done["counts"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 2,
        "failed": 1,
        "cancelled": 0,
        "invalid": 1,
    }
    assert done["cost"]["tflops"] == 1.5 and done["eta_s"] is None
    rows = results(client, api_key, batch["id"])
    assert [(r["custom_id"], r["status"]) for r in rows] == [
        ("a", "succeeded"),
        (None, "invalid"),
        ("b", "failed"),
        ("c", "succeeded"),
    ]
    assert rows[0]["answer"] == "7" and rows[0]["cost"]["generated_tokens"] == 2
    assert rows[2]["error"] == "model fell over"


def test_cancel_keeps_finished_jobs_and_stops_running_ones(
    client: FlaskClient, api_key: str, in_process_settings
) -> None:
    url = in_process_settings.database_url
    batch = upload(client, api_key, jsonl(*[line(str(i)) for i in range(5)])).get_json()
    _finish(url, batch["id"], {1: "succeeded", 2: "running"})
    cancelling = client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth(api_key))
    assert cancelling.status_code == 200
    body = cancelling.get_json()
    assert body["status"] == "cancelling" and body["cancelled_at"]
    assert body["counts"]["cancelled"] == 3 and body["counts"]["succeeded"] == 1
    assert body["counts"]["running"] == 1
    jobs = client.get(f"/v1/jobs?batch_id={batch['id']}", headers=auth(api_key)).get_json()
    running = [job for job in jobs["data"] if job["status"] == "running"]
    assert running[0]["cancel_requested"] is True
    _finish(url, batch["id"], {2: "succeeded"})  # the running stage ended
    done = client.get(batch["status_url"], headers=auth(api_key)).get_json()
    assert done["status"] == "cancelled"
    assert [r["status"] for r in results(client, api_key, batch["id"])] == [
        "succeeded",
        "succeeded",
        "cancelled",
        "cancelled",
        "cancelled",
    ]
    again = client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth(api_key))
    assert again.status_code == 200 and again.get_json()["status"] == "cancelled"


def test_cancel_of_a_queued_batch_is_immediate(client: FlaskClient, api_key: str) -> None:
    batch = upload(client, api_key, jsonl(line("x"), line("y"))).get_json()
    body = client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth(api_key)).get_json()
    assert body["status"] == "cancelled" and body["counts"]["cancelled"] == 2


class FakeBroker:
    def __init__(self, depth: int | None) -> None:
        self.depth = depth

    def depths(self) -> dict[str, int]:
        from services.broker import BrokerUnavailable

        if self.depth is None:
            raise BrokerUnavailable("down")
        return {"coordinator": 0, "classifier": 0, "executor": self.depth}


def test_backpressure_429_and_broker_down_503(in_process_settings, api_key: str) -> None:
    from services.api import create_app
    from services.api.admission import Admission

    app = create_app(in_process_settings, enqueue=Recorder())
    app.extensions["tandem.admission"] = Admission(FakeBroker(10), max_queue_depth=10)
    full = upload(app.test_client(), api_key, jsonl(line("a")))
    problem(full, 429, "queues are full")
    assert full.headers["Retry-After"]
    app.extensions["tandem.admission"] = Admission(FakeBroker(None), max_queue_depth=10)
    problem(upload(app.test_client(), api_key, jsonl(line("a"))), 503, "unavailable")


def test_the_feeder_keeps_batch_lanes_shallow_and_the_reconciler_waits_for_it(
    client: FlaskClient, api_key: str, in_process_settings, recorder: Recorder, monkeypatch
) -> None:
    from sqlalchemy import select, update

    from services import batches
    from services.jobs import reconcile
    from services.storage.db import transaction
    from services.storage.models import Batch, Job
    from tests import infra

    url = in_process_settings.database_url
    infra.end_unfinished_work(url, None)  # this owner's earlier batches would be fed first
    settings = in_process_settings.model_copy(update={"feed_min_depth": 4})
    batch = _upload_unfed(client, api_key, 10, monkeypatch)
    with transaction(url) as session:  # long-forgotten jobs: the reconciler would want them
        session.execute(update(Job).where(Job.batch_id == batch).values(updated_at=_ago(3600)))
    fed: list = []
    reconcile(settings, fed.extend, 1.0, lambda queue: 10**9)  # full lanes: nothing fed
    with transaction(url) as session:
        mine = set(session.scalars(select(Job.id).where(Job.batch_id == batch)))
    assert not mine & {task.job_id for task in fed}  # unfed jobs wait for the feeder
    fed.clear()
    depth: dict[str, int] = {}

    def enqueue(tasks) -> None:  # what Redis would do: the lists grow
        fed.extend(tasks)
        for task in tasks:
            depth[task.queue] = depth.get(task.queue, 0) + 1

    def waiting(queue: str) -> int:
        return depth.get(queue, 0)

    assert batches.feed(settings, enqueue, waiting) == 4  # no capacity known: the minimum
    assert {(task.seq, task.queue) for task in fed} == {(0, "classifier.batch-new")}
    with transaction(url) as session:
        assert session.get_one(Batch, batch).fed_through_line == 4
        lines = session.scalars(
            select(Job.line).where(Job.id.in_([t.job_id for t in fed])).order_by(Job.line)
        )
        assert list(lines) == [1, 2, 3, 4]
    # Workers announce 3 classifier slots: the lanes may hold twice that (factor 2).
    assert batches.feed(settings, enqueue, waiting, lambda: {"classifier": 3}) == 2
    depth.clear()  # the workers took them all
    batches.feed(settings, enqueue, waiting, lambda: {"classifier": 3})
    assert len(fed) == 10 and len({task.job_id for task in fed}) == 10
    del recorder


def _upload_unfed(client: FlaskClient, key: str, n: int, monkeypatch) -> str:
    """Upload without the API's feeding pass, so nothing is fed yet."""
    from services.api import batches as api_batches

    with monkeypatch.context() as patch:
        patch.setattr(api_batches, "start_feeding", lambda app: None)
        response = upload(client, key, jsonl(*[line(str(i)) for i in range(n)]))
    assert response.status_code == 202
    return response.get_json()["id"]


def _ago(seconds: float):
    from datetime import timedelta

    from services.storage.models import utcnow

    return utcnow() - timedelta(seconds=seconds)


def test_line_reader_handles_long_lines_bom_and_missing_final_newline() -> None:
    from services.batches import LineReader

    data = b"\xef\xbb\xbfab\r\n" + b"x" * 25 + b"\nc\n\nlast"
    reader = LineReader(io.BytesIO(data), max_line_bytes=10)
    assert list(reader) == [
        (1, b"\xef\xbb\xbfab\r\n"),
        (2, None),
        (3, b"c\n"),
        (4, b"\n"),
        (5, b"last"),
    ]
    assert reader.bytes_read == len(data)


def test_openapi_documents_batches(client: FlaskClient) -> None:
    from openapi_spec_validator import validate

    document = client.get("/openapi.json").get_json()
    validate(document)
    assert "/v1/batches/{batch_id}/results" in document["paths"]


# --- embedded: `tandem batch run` ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.model
def test_embedded_run_writes_every_line_and_resumes(tmp_path, in_process_settings) -> None:
    from services.batch_cli import run_file

    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(jsonl(line("a", "What is 2 + 2?"), "oops", line("a", "again")))
    first = run_file(source, output, "slm_only", json.dumps({"executor_max_tokens": 4}), 4, False)
    assert first == {"succeeded": 1, "failed": 0, "invalid": 2, "skipped": 0}
    with source.open("a") as handle:  # more lines; the finished ones are not run again
        handle.write(jsonl(line("b", "What is 3 + 3?"), line("c", "What is 1 + 5?")))
    second = run_file(source, output, "slm_only", json.dumps({"executor_max_tokens": 4}), 4, False)
    assert second == {"succeeded": 2, "failed": 0, "invalid": 0, "skipped": 3}
    rows = [json.loads(text) for text in output.read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4, 5]
    by_line = {r["line"]: r for r in rows}
    assert by_line[2]["status"] == "invalid" and "duplicate" in by_line[3]["error"]
    assert by_line[4]["cost"]["generated_tokens"] >= 1 and by_line[5]["status"] == "succeeded"


# --- the real stack: API, Celery workers, reconciler, a Redis we can restart ----------------


class Redis:
    """A throwaway redis-server on a fixed port that the test can stop and start again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}"
        self._server = None

    def start(self) -> None:
        self._server = infra.throwaway_redis(self.port)
        self._server.__enter__()

    def stop(self) -> None:
        if self._server is not None:
            self._server.__exit__(None, None, None)
            self._server = None


class Stack:
    def __init__(self, processes: infra.Processes, base_url: str, key: str, redis: Redis) -> None:
        self.processes = processes
        self.base_url = base_url
        self.key = key
        self.redis = redis
        self.worker_restarts = 0
        self.http = httpx.Client(base_url=base_url, headers=auth(key), timeout=60)

    def tandem(self, *args: str) -> str:
        """Run the `tandem` CLI against this stack; return its stdout."""
        import subprocess

        done = subprocess.run(
            [str(infra.BIN / "tandem"), *args, "--api", self.base_url, "--key", self.key],
            capture_output=True,
            text=True,
            timeout=300,
            env=self.processes.env,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def restart_exited_worker(self) -> None:
        """Do what compose's `restart: unless-stopped` and Kubernetes do: Celery 5.7 with
        kombu 5.7 sometimes exits its worker (AttributeError on `hostname` while closing a
        channel) when Redis goes away under busy threads. No job may be lost either way."""
        worker = self.processes.running.get("executor")
        if worker is not None and worker.poll() is not None:
            self.worker_restarts += 1
            self.processes.worker("executor", concurrency=8)

    def batch(self, batch_id: str) -> dict:
        return self.http.get(f"/v1/batches/{batch_id}").json()

    def wait(self, batch_id: str, until, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.batch(batch_id)
            if until(state):
                return state
            self.restart_exited_worker()
            time.sleep(0.5)
        logs = {name: self.processes.log(name)[-1500:] for name in self.processes.running}
        raise AssertionError(f"batch {batch_id} stuck: {self.batch(batch_id)}; logs: {logs}")


@pytest.fixture(scope="module")
def stack(service_env, api_key, tmp_path_factory) -> Iterator[Stack]:
    # Earlier tests of this module leave queued jobs (other strategies, other queues) in the
    # session database; this stack's reconciler would re-enqueue them onto queues it has no
    # worker for, and their depth would hold the feeder back. Start from a clean slate.
    infra.end_unfinished_work(service_env["TANDEM_DATABASE_URL"], None)
    redis = Redis(infra.free_port())
    redis.start()
    env = {
        **service_env,
        "TANDEM_REDIS_URL": f"{redis.url}/0",
        # Small enough that lost messages are re-enqueued soon after a Redis restart, large
        # enough that a busy machine's slow stages and queue waits do not look lost.
        "TANDEM_STAGE_DEADLINE_S": "10",
        "TANDEM_MAX_STAGE_ATTEMPTS": "10",
        "TANDEM_LOCAL_MAX_BATCH": "8",
        "TANDEM_LOCAL_THREADS": "1",  # llama.cpp threads spin: one per worker on a shared box
        "TANDEM_MAX_QUEUE_DEPTH": "24",  # batches fill at most 12: fed gradually
    }
    processes = infra.Processes(env, Path(tmp_path_factory.mktemp("batch-logs")))
    port = infra.free_port()
    try:
        processes.worker("executor", concurrency=8)
        processes.start("reconciler", [str(infra.BIN / "tandem"), "reconcile", "--interval", "1"])
        processes.api(port)
        yield Stack(processes, f"http://127.0.0.1:{port}", api_key, redis)
    finally:
        processes.stop_all()
        redis.stop()


def _thousand_lines(path: Path) -> set[int]:
    """1,000 lines: 950 cheap questions and 50 malformed ones of ten kinds. Returns the
    malformed lines' numbers."""
    kinds = [
        lambda n: "{not json",
        lambda n: json.dumps({"custom_id": f"q{n}"}),
        lambda n: json.dumps(line(f"q{n}", strategy="sorcery")),
        lambda n: json.dumps(line("q1")),  # duplicate custom_id
        lambda n: json.dumps(line(f"q{n}", "x" * 70_000)),  # over the line limit
        lambda n: json.dumps([n]),
        lambda n: json.dumps({"question": QUESTION}),
        lambda n: json.dumps(line(f"q{n}", params={"executor_max_tokens": 0})),
        lambda n: json.dumps(line(f"q{n}", colour="red")),
        lambda n: json.dumps(line(f"q{n}", "x" * 9000)),  # over the question limit
    ]
    bad = {n for n in range(1, 1001) if n % 20 == 7}
    with path.open("w") as handle:
        for n in range(1, 1001):
            if n in bad:
                handle.write(kinds[(n // 20) % len(kinds)](n) + "\n")
            else:
                handle.write(json.dumps(line(f"q{n}", f"What is {n} + {n % 7}?")) + "\n")
    return bad


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.timeout(3600)  # 950 model jobs: minutes on two idle cores, far more on a busy box
def test_thousand_lines_complete_through_a_redis_restart(stack: Stack, tmp_path: Path) -> None:
    source = tmp_path / "thousand.jsonl"
    bad = _thousand_lines(source)
    assert len(bad) == 50
    out = stack.tandem(
        "batch", "submit", str(source), "--strategy", "slm_only", "--params", json.dumps(CHEAP)
    )
    batch_id = out.split()[1].rstrip(":")
    assert "950 jobs, 50 invalid" in out

    stack.wait(batch_id, lambda s: s["counts"]["succeeded"] >= 250, timeout=2400)
    stack.redis.stop()  # every message on the queues is lost
    time.sleep(2)
    stack.redis.start()
    done = stack.wait(
        batch_id, lambda s: s["status"] in ("completed", "failed", "cancelled"), timeout=3000
    )

    assert done["status"] == "completed", done
    assert done["counts"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 950,
        "failed": 0,
        "cancelled": 0,
        "invalid": 50,
    }
    assert done["request_counts"]["failed"] == 50 and done["request_counts"]["completed"] == 950
    assert done["cost"]["generated_tokens"] >= 950

    results_path = tmp_path / "results.jsonl"
    stack.tandem("batch", "results", batch_id, "-o", str(results_path))
    rows = [json.loads(text) for text in results_path.read_text().splitlines()]
    assert [row["line"] for row in rows] == list(range(1, 1001))
    assert {row["line"] for row in rows if row["status"] == "invalid"} == bad
    answered = [row for row in rows if row["line"] not in bad]
    assert {row["status"] for row in answered} == {"succeeded"}
    assert all(row["cost"]["generated_tokens"] >= 1 for row in answered)
    assert [row["custom_id"] for row in answered] == [f"q{row['line']}" for row in answered]


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.timeout(1800)
def test_cancel_mid_way_keeps_finished_results(stack: Stack, tmp_path: Path) -> None:
    import subprocess

    source = tmp_path / "cancel.jsonl"
    source.write_text(jsonl(*[line(f"c{n}", f"What is {n} * 3?") for n in range(150)]))
    watcher = subprocess.Popen(
        [
            str(infra.BIN / "tandem"),
            "batch",
            "submit",
            str(source),
            "--wait",
            "--strategy",
            "slm_only",
            "--params",
            json.dumps(CHEAP),
            "--api",
            stack.base_url,
            "--key",
            stack.key,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=stack.processes.env,
    )
    listed = lambda: stack.http.get("/v1/batches?limit=1").json()["data"]  # noqa: E731
    wait_until(lambda: listed() and listed()[0]["lines"]["total"] == 150, 60, "the upload")
    batch_id = listed()[0]["id"]
    stack.wait(batch_id, lambda s: s["counts"]["succeeded"] >= 16)
    assert "cancel" in stack.tandem("batch", "cancel", batch_id)
    done = stack.wait(batch_id, lambda s: s["status"] == "cancelled", timeout=120)
    stdout, stderr = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, stderr
    assert f"batch {batch_id}: cancelled" in stdout

    counts = done["counts"]
    assert counts["succeeded"] >= 16 and counts["cancelled"] > 0
    assert counts["succeeded"] + counts["cancelled"] + counts["failed"] == 150
    assert counts["queued"] == counts["running"] == 0
    time.sleep(3)
    assert stack.batch(batch_id)["counts"] == counts  # nothing ran after the cancel
    rows = [json.loads(text) for text in stack.tandem("batch", "results", batch_id).splitlines()]
    assert [row["line"] for row in rows] == list(range(1, 151))
    kept = [row for row in rows if row["status"] == "succeeded"]
    assert len(kept) == counts["succeeded"] and all(row["cost"]["generated_tokens"] for row in kept)


def test_ingest_on_sqlite_too(tmp_path: Path) -> None:
    """Embedded mode's database: chunked INSERTs instead of COPY, same results."""
    from services import batches
    from services.storage.db import upgrade

    url = f"sqlite:///{tmp_path / 'batches.db'}"
    upgrade(url)
    body = jsonl(line("a"), "nope", line("b", params={"seed": 3}), line("a"))
    defaults = batches.parse_defaults("slm_only", None, 8000)
    batch, created = batches.ingest(url, "local", io.BytesIO(body.encode()), defaults, 8000)
    assert created and (batch.total_lines, batch.invalid_lines) == (4, 2)
    rows = list(batches.results(url, batch.id, batch.errors))
    assert [(r["line"], r["status"]) for r in rows] == [
        (1, "queued"),
        (2, "invalid"),
        (3, "queued"),
        (4, "invalid"),
    ]
    assert "first used on line 1" in rows[3]["error"]
