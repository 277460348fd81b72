"""Mixed workloads (issue 16): interactive stages ahead of batch stages, owners fed in turns,
a per-owner limit on unfinished batch lines. Real Postgres, Redis and Celery workers."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from services.storage.db import transaction
from services.storage.models import Job, Stage
from tests import infra

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
CHEAP = {"executor_max_tokens": 2}


def jsonl(n: int, prefix: str) -> str:
    rows = [{"custom_id": f"{prefix}{i}", "question": QUESTION} for i in range(n)]
    return "".join(json.dumps(row) + "\n" for row in rows)


class Stack:
    def __init__(self, processes: infra.Processes, base_url: str, keys: dict[str, str]) -> None:
        self.processes = processes
        self.base_url = base_url
        self.keys = keys

    def client(self, owner: str) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[owner]}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def upload(self, owner: str, n: int, prefix: str) -> dict:
        with self.client(owner) as http:
            response = http.post(
                "/v1/batches",
                params={"strategy": "slm_only", "params": json.dumps(CHEAP)},
                content=jsonl(n, prefix),
                headers={"Content-Type": "application/jsonl"},
            )
        assert response.status_code == 202, response.text
        return response.json()

    def submit(self, owner: str) -> dict:
        body = {"question": QUESTION, "strategy": "slm_only", "params": CHEAP}
        with self.client(owner) as http:
            response = http.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        return response.json()


@pytest.fixture(scope="module")
def keys(in_process_settings) -> dict[str, str]:
    from services.api.auth import create_key

    with transaction(in_process_settings.database_url) as session:
        return {owner: create_key(session, owner) for owner in ("lane-a", "lane-b", "lane-c")}


def start_stack(service_env, keys, log_dir: Path, **env: str) -> Stack:
    processes = infra.Processes({**service_env, **env}, log_dir)
    port = infra.free_port()
    processes.api(port)
    return Stack(processes, f"http://127.0.0.1:{port}", keys)


@pytest.fixture
def stack(service_env, keys, tmp_path) -> Iterator[Stack]:
    infra.end_unfinished_work(service_env["TANDEM_DATABASE_URL"], service_env["TANDEM_REDIS_URL"])
    stack = start_stack(service_env, keys, tmp_path, TANDEM_FEED_MIN_DEPTH="64")
    try:
        yield stack
    finally:
        stack.processes.stop_all()
        infra.end_unfinished_work(
            service_env["TANDEM_DATABASE_URL"], service_env["TANDEM_REDIS_URL"]
        )


def started_order(url: str, job_ids: list[str]) -> list[str]:
    with transaction(url) as session:
        rows = session.execute(
            select(Job.id).where(Job.id.in_(job_ids)).order_by(Job.started_at, Job.id)
        )
        return list(rows.scalars())


def wait_until(check, timeout: float = 240, what: str = "the jobs") -> None:
    infra.wait_for(check, timeout, what, interval=0.25)


@pytest.mark.slow
def test_an_interactive_stage_is_taken_before_queued_batch_stages(stack: Stack, service_env):
    """Batch stages wait in their lanes (no worker yet); a single job submitted after them
    is the first one a worker takes."""
    url = service_env["TANDEM_DATABASE_URL"]
    batch = stack.upload("lane-a", 20, "a")
    redis = __import__("redis").Redis.from_url(service_env["TANDEM_REDIS_URL"])
    wait_until(lambda: redis.llen("executor.batch-new") >= 20, 60, "the batch's messages")
    single = stack.submit("lane-c")
    stack.processes.worker("executor", concurrency=1)
    wait_until(lambda: _finished(url, batch_id=batch["id"]) == 20)
    with transaction(url) as session:
        batch_ids = list(session.scalars(select(Job.id).where(Job.batch_id == batch["id"])))
    order = started_order(url, [single["id"], *batch_ids])
    assert order[0] == single["id"], "the batch's stages ran before the single job's"


@pytest.mark.slow
def test_a_worker_killed_with_both_lanes_busy_loses_nothing(stack: Stack, service_env):
    url = service_env["TANDEM_DATABASE_URL"]
    stack.processes.worker("executor", concurrency=4)
    stack.processes.start(
        "reconciler", [str(infra.BIN / "tandem"), "reconcile", "--interval", "1"]
    )
    batch = stack.upload("lane-a", 40, "k")
    singles = [stack.submit("lane-c")["id"] for _ in range(6)]
    wait_until(lambda: _finished(url, batch_id=batch["id"]) >= 5, 120, "some batch jobs")
    stack.processes.kill("executor", signal.SIGKILL)
    singles += [stack.submit("lane-c")["id"] for _ in range(4)]
    stack.processes.worker("executor", concurrency=4)
    wait_until(
        lambda: _finished(url, batch_id=batch["id"]) == 40 and _finished(url, ids=singles) == 10,
        400,
    )
    with transaction(url) as session:
        statuses = session.execute(
            select(Job.status).where((Job.batch_id == batch["id"]) | Job.id.in_(singles))
        ).scalars()
        assert set(statuses) == {"succeeded"}
        stages = session.execute(
            select(Stage.job_id, Stage.seq)
            .join(Job, Job.id == Stage.job_id)
            .where((Job.batch_id == batch["id"]) | Job.id.in_(singles))
        ).all()
    assert len(stages) == 50 and len(set(stages)) == 50  # one stage each, never twice


@pytest.mark.slow
def test_a_model_server_is_sent_each_stages_lane_priority(stack: Stack, service_env, tmp_path):
    """End to end against a SIMULATED SGLang server (bench/sim_server.py: a stand-in, as no
    GPU model server runs here): the executor's requests for batch lines carry SGLang
    priority 0, a single job's 100 (services/core/backends/openai_http.SGLANG_PRIORITY)."""
    from bench import simulated

    url = service_env["TANDEM_DATABASE_URL"]
    _, sim = simulated.serve(
        stack.processes, "executor", simulated.EXECUTOR_7B, tmp_path / "hub", "--record"
    )
    stack.processes.worker("executor", concurrency=4)
    batch = stack.upload("lane-a", 3, "p")
    single = stack.submit("lane-c")["id"]
    wait_until(
        lambda: _finished(url, batch_id=batch["id"]) == 3 and _finished(url, ids=[single]) == 1,
        120,
    )
    with transaction(url) as session:
        batch_ids = set(session.scalars(select(Job.id).where(Job.batch_id == batch["id"])))
    log = httpx.get(f"{sim}/sim/log").json()
    sent = {
        entry["body"]["rid"].split(":")[0]: entry["body"]["priority"]
        for entry in log
        if entry["path"] == "/v1/completions"
    }
    assert sent == {single: 100, **dict.fromkeys(batch_ids, 0)}


def test_owners_batches_are_fed_in_turns(in_process_settings, keys) -> None:
    """The feeder gives each owner an equal share of the room: a small batch uploaded after
    a big one is fed alongside it, not behind it; within one owner, batches keep order."""
    from services import batches
    from services.batches import feeder
    from services.storage import batch_rows

    settings = in_process_settings.model_copy(update={"feed_min_depth": 10})
    url = settings.database_url
    infra.end_unfinished_work(url, None)
    big = _ingest(url, "lane-a", 30, "big")
    later = _ingest(url, "lane-a", 5, "later")
    small = _ingest(url, "lane-b", 5, "small")
    fed: list = []
    waiting: dict[str, int] = {}

    def enqueue(tasks) -> None:  # type: ignore[no-untyped-def]
        fed.extend(tasks)
        for task in tasks:
            waiting[task.queue] = waiting.get(task.queue, 0) + 1

    batches.feed(settings, enqueue, lambda queue: waiting.get(queue, 0))
    owners = _owners_of(url, fed)
    assert owners.count("lane-a") == 5 and owners.count("lane-b") == 5
    with transaction(url) as session:
        assert batch_rows.unfed_by_owner(session)["lane-a"] == [big, later]  # in their order
    waiting.clear()
    batches.feed(settings, enqueue, lambda queue: waiting.get(queue, 0))
    with transaction(url) as session:
        assert small not in {b for ids in batch_rows.unfed_by_owner(session).values() for b in ids}
    assert feeder.FEED_CHUNK >= 10


def test_the_per_owner_limit_answers_429(in_process_settings, keys) -> None:
    from services.api import create_app

    settings = in_process_settings.model_copy(update={"max_batch_lines_per_owner": 3})
    infra.end_unfinished_work(settings.database_url, None)
    app = create_app(settings, enqueue=lambda tasks: None)
    client = app.test_client()
    headers = {"Authorization": f"Bearer {keys['lane-b']}", "Content-Type": "application/jsonl"}
    first = client.post("/v1/batches", data=jsonl(2, "x"), headers=headers)
    assert first.status_code == 202
    over = client.post("/v1/batches", data=jsonl(2, "y"), headers=headers)
    assert over.status_code == 429 and over.mimetype == "application/problem+json"
    assert "TANDEM_MAX_BATCH_LINES_PER_OWNER" in over.get_json()["detail"]
    assert over.headers["Retry-After"]
    full = client.post("/v1/batches", data=jsonl(1, "z"), headers=headers)
    assert full.status_code == 202  # one line of room was left
    refused = client.post("/v1/batches", data=jsonl(1, "w"), headers=headers)
    assert refused.status_code == 429 and refused.get_json().get("batch_id") is None
    client.post(f"/v1/batches/{first.get_json()['id']}/cancel", headers=headers)
    again = client.post("/v1/batches", data=jsonl(2, "v"), headers=headers)
    assert again.status_code == 202  # room again once lines finished


def _ingest(url: str, owner: str, n: int, prefix: str) -> str:
    import io

    from services import batches

    defaults = batches.parse_defaults("slm_only", json.dumps(CHEAP), 8000)
    batch, _ = batches.ingest(url, owner, io.BytesIO(jsonl(n, prefix).encode()), defaults, 8000)
    return batch.id


def _owners_of(url: str, tasks) -> list[str]:  # type: ignore[no-untyped-def]
    with transaction(url) as session:
        query = select(Job.id, Job.owner).where(Job.id.in_([t.job_id for t in tasks]))
        owners = {row.id: row.owner for row in session.execute(query)}
    return [owners[task.job_id] for task in tasks]


def _finished(url: str, batch_id: str | None = None, ids: list[str] | None = None) -> int:
    with transaction(url) as session:
        query = select(Job.id).where(Job.status.in_(("succeeded", "failed", "cancelled")))
        query = query.where(Job.batch_id == batch_id) if batch_id else query.where(Job.id.in_(ids))
        return len(session.scalars(query).all())


def test_a_stage_runs_at_its_lanes_priority_on_the_engine() -> None:
    from services.core.backends.base import Priority
    from workers.tasks import engine_priority

    assert engine_priority("executor") is Priority.INTERACTIVE
    assert engine_priority("coordinator.batch") is Priority.BATCH
    assert engine_priority("classifier.batch-new") is Priority.BATCH
    assert engine_priority("?") is Priority.INTERACTIVE  # no delivery info: never demoted
