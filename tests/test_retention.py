"""Retention and deletion on real Postgres: what a purge deletes and what it leaves, the
totals that survive it (usage rollups), owners' DELETEs (the texts are gone: read from the
tables themselves), and a purge of tens of thousands of rows beside live traffic on real
worker processes, whose job latency is measured while it runs."""

from __future__ import annotations

import re
import statistics
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

from tests import infra

DAYS_AGO = 40  # seeded rows are this old; purges here keep 30 days


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sql(url: str, statement: str, **params):
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(statement), params)
            return result.all() if result.returns_rows else result.rowcount
    finally:
        engine.dispose()


def scalar(url: str, statement: str, **params):
    return sql(url, statement, **params)[0][0]


@pytest.fixture()
def owner_key(in_process_settings) -> tuple[str, str]:
    from services.api.auth import create_key
    from services.storage.db import transaction

    owner = f"ret-{uuid.uuid4().hex[:8]}"
    with transaction(in_process_settings.database_url) as session:
        return owner, create_key(session, owner)


@pytest.fixture(scope="module")
def client(in_process_settings) -> FlaskClient:
    from services.api import create_app

    return create_app(in_process_settings, enqueue=lambda tasks: None).test_client()


def make_job(
    url: str,
    owner: str,
    *,
    status: str = "succeeded",
    strategy: str = "slm_only",
    stages: int = 2,
    days_ago: float = DAYS_AGO,
    batch_id: str | None = None,
    line: int | None = None,
    question: str | None = None,
) -> str:
    """A job as the services leave it (status changes through job_rows), then dated back."""
    from services.core.requests import parse_job_request
    from services.core.steps import Outcome, StageRecord
    from services.storage import job_rows, stage_rows
    from services.storage.db import transaction

    request = parse_job_request(
        {"question": question or f"q {uuid.uuid4().hex}", "strategy": strategy}, 8000
    )
    with transaction(url) as session:
        job = job_rows.new_job(owner, request, batch_id=batch_id, line=line, custom_id=f"c{line}")
        session.add(job)
        session.flush()
        job_id = job.id
        for seq in range(stages):
            record = StageRecord(
                seq=seq, kind="executor", role="executor", model="m", prompt_tokens=10 + seq,
                generated_tokens=5, tflops=0.25 * (seq + 1), prefill_tflops=0.1,
            )
            stage_rows.add_stage(session, job_id, record)
        if status == "succeeded":
            job_rows.mark_succeeded(session, job_id, Outcome("7", "seven", {}))
        elif status == "failed":
            job_rows.mark_failed(session, job_id, "boom")
        elif status == "cancelled":
            job_rows.mark_cancelled(session, job_id)
        elif status == "running":
            job_rows.mark_running(session, job_id)
    sql(
        url,
        "UPDATE jobs SET created_at = now() - make_interval(days => :d), "
        "finished_at = CASE WHEN finished_at IS NULL THEN NULL "
        "ELSE now() - make_interval(days => :d) END WHERE id = :id",
        d=days_ago,
        id=job_id,
    )
    return job_id


def make_batch(url: str, owner: str, status: str, jobs: list[str], days_ago: float = DAYS_AGO) -> str:
    from services.storage.db import transaction
    from services.storage.models import Batch

    with transaction(url) as session:
        batch = Batch(owner=owner, status=status, strategy="slm_only", total_lines=len(jobs))
        session.add(batch)
        session.flush()
        batch_id = batch.id
    for line, status_of_job in enumerate(jobs, start=1):
        make_job(url, owner, status=status_of_job, batch_id=batch_id, line=line, days_ago=days_ago)
    finished = "now() - make_interval(days => :d)" if status in ("completed", "failed", "cancelled") else "NULL"
    sql(
        url,
        f"UPDATE batches SET created_at = now() - make_interval(days => :d), finished_at = {finished} "
        "WHERE id = :id",
        d=days_ago,
        id=batch_id,
    )
    return batch_id


def totals(client: FlaskClient, key: str) -> dict:
    body = client.get("/v1/dashboard/overview?hours=2160", headers=auth(key)).get_json()
    return {"jobs": body["jobs"], "strategies": body["strategies"]}


def exists(url: str, table: str, column: str, value: str) -> int:
    return scalar(url, f"SELECT count(*) FROM {table} WHERE {column} = :v", v=value)


# --- purge -------------------------------------------------------------------------------


def test_purge_deletes_what_is_old_and_finished_and_the_totals_survive(
    in_process_settings, client: FlaskClient, owner_key
) -> None:
    from services.retention import purge

    url = in_process_settings.database_url
    owner, key = owner_key
    old = [
        make_job(url, owner, status="succeeded"),
        make_job(url, owner, status="succeeded", strategy="llm_only", stages=3),
        make_job(url, owner, status="failed", stages=1),
        make_job(url, owner, status="cancelled", stages=0),
    ]
    unfinished = [make_job(url, owner, status="queued", stages=0), make_job(url, owner, status="running")]
    recent = make_job(url, owner, status="succeeded", days_ago=1)
    done_batch = make_batch(url, owner, "completed", ["succeeded", "failed"])
    live_batch = make_batch(url, owner, "in_progress", ["succeeded", "queued"])
    before = totals(client, key)
    assert before["jobs"]["total"] == 11 and before["jobs"]["tflops"] > 0

    report = purge(url, timedelta(days=30), chunk=2)
    assert report.done and report.jobs >= 6 and report.batches >= 1
    for job_id in old:
        assert exists(url, "jobs", "id", job_id) == 0 and exists(url, "stages", "job_id", job_id) == 0
    for job_id in [*unfinished, recent]:
        assert exists(url, "jobs", "id", job_id) == 1
    assert exists(url, "stages", "job_id", unfinished[1]) == 2  # its stages untouched
    assert exists(url, "batches", "id", done_batch) == 0 and exists(url, "jobs", "batch_id", done_batch) == 0
    assert exists(url, "batches", "id", live_batch) == 1 and exists(url, "jobs", "batch_id", live_batch) == 2
    # The dashboard's totals are the same: what was deleted is in the rollups.
    assert totals(client, key) == before
    rolled = sql(
        url,
        "SELECT status, sum(jobs), sum(generated_tokens) FROM usage_rollups WHERE owner = :o "
        "GROUP BY status ORDER BY status",
        o=owner,
    )
    assert [(s, int(n), int(t)) for s, n, t in rolled] == [
        ("cancelled", 1, 0),
        ("failed", 2, 15),
        ("succeeded", 3, 35),
    ]
    # Purging again finds nothing of this owner's; the counters are not added twice.
    purge(url, timedelta(days=30))
    assert totals(client, key) == before


def test_tandem_purge_command(service_env, in_process_settings, owner_key) -> None:
    import os
    import subprocess

    url = in_process_settings.database_url
    owner, _key = owner_key
    job_id = make_job(url, owner, days_ago=50)
    kept = make_job(url, owner, days_ago=10)
    done = subprocess.run(
        [str(infra.BIN / "tandem"), "purge", "--older-than", "30"],
        env={**os.environ, **service_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert re.match(r"deleted \d+ job\(s\)", done.stdout), done.stdout
    assert exists(url, "jobs", "id", job_id) == 0 and exists(url, "jobs", "id", kept) == 1
    bad = subprocess.run(
        [str(infra.BIN / "tandem"), "purge", "--older-than", "-1"],
        env={**os.environ, **service_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "older-than" in bad.stderr


# --- DELETE ------------------------------------------------------------------------------


def test_delete_a_job(in_process_settings, client: FlaskClient, owner_key, other_key) -> None:
    url = in_process_settings.database_url
    owner, key = owner_key
    question = f"a question to forget {uuid.uuid4().hex}"
    queued = client.post("/v1/jobs", json={"question": question}, headers=auth(key)).get_json()
    response = client.delete(f"/v1/jobs/{queued['id']}", headers=auth(key))
    assert response.status_code == 409 and "not finished" in response.get_json()["detail"]
    finished = make_job(url, owner, days_ago=0, question=question)
    before = totals(client, key)
    assert client.delete(f"/v1/jobs/{finished}", headers=auth(other_key)).status_code == 404
    gone = client.delete(f"/v1/jobs/{finished}", headers=auth(key))
    assert gone.status_code == 200 and gone.get_json() == {"id": finished, "object": "job", "deleted": True}
    assert client.get(f"/v1/jobs/{finished}", headers=auth(key)).status_code == 404
    assert client.delete(f"/v1/jobs/{finished}", headers=auth(key)).status_code == 404
    assert exists(url, "jobs", "id", finished) == 0 and exists(url, "stages", "job_id", finished) == 0
    assert exists(url, "jobs", "question", question) == 1  # only the queued one is left
    assert totals(client, key) == before  # counted in the rollups
    batch = make_batch(url, owner, "completed", ["succeeded"], days_ago=0)
    [(line_job,)] = sql(url, "SELECT id FROM jobs WHERE batch_id = :b", b=batch)
    in_batch = client.delete(f"/v1/jobs/{line_job}", headers=auth(key))
    assert in_batch.status_code == 409 and "batch" in in_batch.get_json()["detail"]
    assert client.delete("/v1/jobs/" + "x" * 300, headers=auth(key)).status_code == 404


def test_delete_a_batch(
    in_process_settings, client: FlaskClient, owner_key, other_key, monkeypatch
) -> None:
    from services.api import batches as batches_api
    from services.retention import purge

    url = in_process_settings.database_url
    owner, key = owner_key
    question = f"a batch line to forget {uuid.uuid4().hex}"
    body = "".join(f'{{"custom_id": "l{i}", "question": "{question}"}}\n' for i in range(3))
    batch = client.post(
        "/v1/batches?strategy=slm_only", data=body, headers={**auth(key), "Content-Type": "application/jsonl"}
    ).get_json()
    path = f"/v1/batches/{batch['id']}"
    busy = client.delete(path, headers=auth(key))
    assert busy.status_code == 409 and "in_progress" in busy.get_json()["detail"]
    client.post(f"{path}/cancel", headers=auth(key))
    # A read finalizes it (unless the upload's feeder pass holds the batch at that moment).
    infra.wait_for(
        lambda: client.get(path, headers=auth(key)).get_json()["status"] == "cancelled", 10, "cancel"
    )
    assert client.delete(path, headers=auth(other_key)).status_code == 404
    gone = client.delete(path, headers=auth(key))
    assert gone.status_code == 200 and gone.get_json()["rows_deleted"] is True
    for read in (path, f"{path}/results"):
        assert client.get(read, headers=auth(key)).status_code == 404
    assert client.delete(path, headers=auth(key)).status_code == 404
    listed = client.get("/v1/batches?limit=200", headers=auth(key)).get_json()["data"]
    assert batch["id"] not in {b["id"] for b in listed}
    assert exists(url, "batches", "id", batch["id"]) == 0
    assert exists(url, "jobs", "batch_id", batch["id"]) == 0
    assert exists(url, "jobs", "question", question) == 0

    # A batch too big for the request: 202, invisible at once, its rows deleted by the next
    # purge (which the reconciler runs whether retention is set or not).
    big = make_batch(url, owner, "completed", ["succeeded"] * 5, days_ago=0)
    monkeypatch.setattr(batches_api, "DELETE_BUDGET_S", 0.0)
    later = client.delete(f"/v1/batches/{big}", headers=auth(key))
    assert later.status_code == 202 and later.get_json()["rows_deleted"] is False
    assert client.get(f"/v1/batches/{big}", headers=auth(key)).status_code == 404
    assert exists(url, "jobs", "batch_id", big) == 5
    report = purge(url, None)
    assert report.batches >= 1 and exists(url, "batches", "id", big) == 0
    assert exists(url, "jobs", "batch_id", big) == 0


# --- a purge beside live traffic -----------------------------------------------------------


SEEDED = 30_000


def seed(url: str, owner: str, n: int) -> str:
    """`n` finished single jobs with 3 stages each, 60 days old, in two statements."""
    tag = uuid.uuid4().hex[:8]
    sql(
        url,
        "INSERT INTO jobs (id, owner, strategy, question, params, status, answer, final_text, "
        "summary, cancel_requested, attempts, leases, created_at, started_at, finished_at, updated_at) "
        "SELECT 'job_' || :tag || lpad(g::text, 24, '0'), :owner, 'slm_only', 'seeded ' || g, "
        "'{}'::jsonb, 'succeeded', '1', 'one', '{}'::jsonb, false, 1, '{}'::jsonb, "
        "now() - interval '60 days', now() - interval '60 days', now() - interval '60 days', "
        "now() - interval '60 days' FROM generate_series(1, :n) g",
        tag=tag,
        owner=owner,
        n=n,
    )
    sql(
        url,
        "INSERT INTO stages (job_id, seq, kind, role, model, prompt_tokens, cached_prompt_tokens, "
        "generated_tokens, tflops, prefill_tflops, latency_s, note, output, attempt, created_at) "
        "SELECT 'job_' || :tag || lpad(g::text, 24, '0'), s, 'executor', 'executor', 'm', 10, 0, "
        "5, 0.5, 0.1, 0.01, '', '{}'::jsonb, 1, now() - interval '60 days' "
        "FROM generate_series(1, :n) g, generate_series(0, 2) s",
        tag=tag,
        n=n,
    )
    return tag


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@pytest.mark.slow
@pytest.mark.model
def test_a_purge_beside_live_traffic_does_not_stall_the_workers(
    service_env, in_process_settings, api_key, tmp_path: Path
) -> None:
    """30,000 old jobs (90,000 stages) are purged by `tandem purge` while clients keep two
    one-token jobs in flight on a real executor worker through the API process. Every live
    job succeeds with its stage recorded; their latency (created -> finished, database
    clock) during the purge stays close to the latency before it."""
    import httpx

    from services.api.dashboard import job_totals
    from services.storage.db import transaction
    from services.storage.models import utcnow

    url = in_process_settings.database_url
    bulk = f"ret-bulk-{uuid.uuid4().hex[:6]}"
    tag = seed(url, bulk, SEEDED)
    since = utcnow() - timedelta(days=90)
    with transaction(url) as session:
        before = job_totals(session, bulk, since)
    assert before["total"] == SEEDED

    processes = infra.Processes(service_env, tmp_path)
    port = infra.free_port()
    params = {"budgets": [0], "executor_max_tokens": 1}
    try:
        processes.worker("executor", concurrency=2)
        processes.api(port)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth(api_key), timeout=30)

        def one_job() -> str:
            body = {"question": "What is 2 + 2?", "strategy": "slm_only", "params": params}
            job_id = http.post("/v1/jobs", json=body).json()["id"]
            while http.get(f"/v1/jobs/{job_id}").json()["status"] in ("queued", "running"):
                time.sleep(0.05)
            return job_id

        def traffic(stop: threading.Event, done: list[str]) -> None:
            while not stop.is_set():
                done.append(one_job())

        def run_traffic(seconds: float | None, until: threading.Event | None = None) -> list[str]:
            stop = threading.Event()
            done: list[str] = []
            threads = [threading.Thread(target=traffic, args=(stop, done)) for _ in range(2)]
            for thread in threads:
                thread.start()
            if until is not None:
                until.wait(600)
            else:
                time.sleep(seconds or 0)
            stop.set()
            for thread in threads:
                thread.join(60)
            return done

        one_job()  # the worker's model is loaded
        baseline = run_traffic(15)
        purged = threading.Event()
        outcome: dict = {}

        def run_purge() -> None:
            import os
            import subprocess

            started = time.monotonic()
            outcome["run"] = subprocess.run(
                [str(infra.BIN / "tandem"), "purge", "--older-than", "30", "--chunk", "500"],
                env={**os.environ, **service_env},
                capture_output=True,
                text=True,
                timeout=600,
            )
            outcome["seconds"] = time.monotonic() - started
            purged.set()

        time.sleep(0.5)
        threading.Thread(target=run_purge).start()
        during = run_traffic(None, until=purged)
    finally:
        processes.stop_all()

    run = outcome["run"]
    assert run.returncode == 0, run.stderr
    assert scalar(url, "SELECT count(*) FROM jobs WHERE id LIKE :p", p=f"job_{tag}%") == 0
    assert scalar(url, "SELECT count(*) FROM stages WHERE job_id LIKE :p", p=f"job_{tag}%") == 0
    with transaction(url) as session:
        after = job_totals(session, bulk, since)
    # 30,000 jobs and their tokens and TFLOPs, now from the rollups (sums of floats in
    # another order: equal to rounding).
    assert after.pop("counts") == before.pop("counts")
    assert after == pytest.approx(before, rel=1e-9)

    def latencies(ids: list[str]) -> list[float]:
        rows = sql(
            url,
            "SELECT j.status, extract(epoch FROM j.finished_at - j.created_at), count(s.id) "
            "FROM jobs j LEFT JOIN stages s ON s.job_id = j.id WHERE j.id = ANY(:ids) "
            "GROUP BY j.id",
            ids=ids,
        )
        assert all(status == "succeeded" and stages == 1 for status, _, stages in rows), rows
        return [float(seconds) for _, seconds, _ in rows]

    base, live = latencies(baseline), latencies(during)
    print(
        f"\npurge of {SEEDED} jobs + {3 * SEEDED} stages: {outcome['seconds']:.1f} s "
        f"({SEEDED / outcome['seconds']:.0f} jobs/s); live jobs before: {len(base)}, "
        f"p50 {statistics.median(base) * 1000:.0f} ms, p95 {percentile(base, 0.95) * 1000:.0f} ms, "
        f"max {max(base) * 1000:.0f} ms; during: {len(live)}, "
        f"p50 {statistics.median(live) * 1000:.0f} ms, p95 {percentile(live, 0.95) * 1000:.0f} ms, "
        f"max {max(live) * 1000:.0f} ms"
    )
    assert len(live) >= 5, "too little traffic ran during the purge to judge"
    # No stall: a lock wait or a long transaction would show as seconds; the two cores
    # shared by the purge, Postgres, the worker and the API allow a few times the baseline.
    assert max(live) < max(1.0, 4 * percentile(base, 0.95)), (base, live)
