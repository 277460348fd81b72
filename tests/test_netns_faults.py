"""Faults across real network hops: Postgres and Redis, the API, the workers and the
reconciler on separate hosts (network namespaces on this machine, joined point to point by
veth pairs), and links taken down and brought back up (this kernel has no `tc netem`).

    data   Postgres and Redis, listening on the data end of every link below
    api    `tandem api`          links pg-api, redis-api to data; host-api to this test
    work   3 Celery workers      links pg-work, redis-work to data
    rec    `tandem reconcile`    links pg-rec, redis-rec to data
    (this test's own namespace)  link host-data to data: it reads Postgres directly

Each client reaches Postgres and Redis over a link of its own, so a fault cuts exactly one
path. A link is taken down at the data end: the client's end loses its carrier and what it
sends is dropped, as when a cable is pulled on the far side of a switch (no reset, no
refusal: connections go silent). The scenarios, each on its own jobs:

1. the workers cut off from Redis for 30 s in the middle of a batch;
2. the workers cut off from Postgres for 30 s while stages run (the reconciler, on its own
   host, still sees Postgres and Redis: it re-grants the stages whose heartbeats stopped);
3. the API cut off from Postgres for 10 s while a client submits every 0.25 s.

For each: every accepted job finishes (succeeded), no stage is recorded twice, each job has
exactly the stages it has when run embedded, and the processes recover by themselves; a
process that exits is restarted the way a deployment's supervisor would (counted and
printed). Each scenario prints its timeline. Needs root and `ip netns` (iproute2); skips
with the reason otherwise. Namespaces are removed whatever happens (a SIGTERM included; a
run killed outright has its namespaces swept by the next one).

Also here (fast): the fix the first scenario needed, on its own (workers/transport.py).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests import infra

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
SLM = ("slm_only", {"executor_max_tokens": 2})
TANDEM = ("tandem", {"budgets": [0, 4], "executor_max_tokens": 4, "cost_preference": "quality"})
LONG = ("slm_only", {"executor_max_tokens": 48})  # a stage that lasts a while
FINAL = ("succeeded", "failed", "cancelled")
DEADLINE_S = 6
QUEUES = ("coordinator", "classifier", "executor")
COMPARED = ("seq", "kind", "role", "model", "prompt_tokens", "generated_tokens")


# --- the stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    lab: infra.NetworkLab
    database_url: str  # as this test reaches it (its own link)
    hosts: dict[str, infra.Processes]
    netns: dict[str, str]
    api_url: str
    key: str
    restarts: list[str] = field(default_factory=list)

    def http(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(
            base_url=self.api_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=timeout
        )

    def query(self, sql: str, **params) -> list:
        return infra.query(self.database_url, sql, **params)

    def start_worker(self, queue: str) -> None:
        self.hosts["work"].worker(queue, concurrency=4, netns=self.netns["work"])

    def start_reconciler(self) -> None:
        argv = [str(infra.BIN / "tandem"), "reconcile", "--interval", "1"]
        self.hosts["rec"].start("reconciler", argv, self.netns["rec"])

    def supervise(self) -> None:
        """What `restart: unless-stopped` (compose) or a Deployment does for a process that
        exited: start it again, and remember it."""
        for queue in QUEUES:
            process = self.hosts["work"].running.get(queue)
            if process is not None and process.poll() is not None:
                tail = self.hosts["work"].log(queue)[-400:].replace("\n", " | ")
                self.restarts.append(f"{queue} worker exited ({process.returncode}): {tail}")
                self.hosts["work"].running.pop(queue)
                self.start_worker(queue)
        process = self.hosts["rec"].running.get("reconciler")
        if process is not None and process.poll() is not None:
            self.restarts.append(f"reconciler exited ({process.returncode})")
            self.hosts["rec"].running.pop("reconciler")
            self.start_reconciler()

    def statuses(self, ids: list[str]) -> dict[str, str]:
        return dict(self.query("SELECT id, status FROM jobs WHERE id = ANY(:ids)", ids=ids))

    def stage_count(self, ids: list[str]) -> int:
        return self.query("SELECT count(*) FROM stages WHERE job_id = ANY(:ids)", ids=ids)[0][0]

    def running_stages(self, ids: list[str]) -> int:
        """Stages held right now (a lease with a holder): work in the middle of a stage."""
        return self.query(
            "SELECT count(*) FROM jobs j, jsonb_each(j.leases) AS l(seq, lease)"
            " WHERE j.id = ANY(:ids) AND l.lease ->> 'holder' IS NOT NULL",
            ids=ids,
        )[0][0]

    def logs(self) -> str:
        parts = []
        for host in self.hosts.values():
            parts += [f"--- {name}\n{host.log(name)[-1500:]}" for name in host.running]
        return "\n".join(parts)


def _exit_on_sigterm(_signum, _frame) -> None:
    raise SystemExit("SIGTERM")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    reason = infra.NetworkLab.unavailable()
    if reason:
        pytest.skip(reason)
    from sqlalchemy import create_engine, text

    from services.storage.db import dispose_engines, upgrade

    logs = Path(tmp_path_factory.mktemp("netns-logs"))
    lab = infra.NetworkLab()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lab.close)  # last: whatever happened before
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # a stopped run cleans up
        cleanup.callback(signal.signal, signal.SIGTERM, previous)
        try:
            netns = {name: lab.host(name) for name in ("data", "api", "work", "rec")}
        except Exception as error:  # e.g. a container without CAP_SYS_ADMIN
            pytest.skip(f"cannot create network namespaces here: {error}")
        links = {}
        for client in ("api", "work", "rec"):
            links[f"pg-{client}"] = lab.link(f"pg-{client}", "data", client)
            links[f"redis-{client}"] = lab.link(f"redis-{client}", "data", client)
        links["host-data"] = lab.link("host-data", "data", None)
        links["host-api"] = lab.link("host-api", "api", None)

        pg_on = [links[name].a_addr for name in ("host-data", "pg-api", "pg-work", "pg-rec")]
        pg = infra.ThrowawayPostgres(listen=pg_on, netns=netns["data"])
        cleanup.callback(pg.remove)
        pg.start()
        admin = create_engine(pg.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text("CREATE DATABASE tandem"))
        admin.dispose()
        database_url = pg.url_on(links["host-data"].a_addr, "tandem")
        upgrade(database_url)

        redis_on = [links[n].a_addr for n in ("host-data", "redis-api", "redis-work", "redis-rec")]
        redis_url, _ = cleanup.enter_context(
            infra.throwaway_redis(bind=redis_on, netns=netns["data"])
        )
        redis_port = redis_url.rsplit(":", 1)[1]

        common = {
            "TANDEM_STAGE_DEADLINE_S": str(DEADLINE_S),
            "TANDEM_MAX_STAGE_ATTEMPTS": "10",
            "TANDEM_LOCAL_MAX_BATCH": "4",
            "TANDEM_LOCAL_THREADS": "1",
            "TANDEM_RATE_LIMIT_PER_MINUTE": "0",
            "TANDEM_LOG_LEVEL": "INFO",
        }
        hosts = {}
        for client in ("api", "work", "rec"):
            env = {
                **common,
                "TANDEM_DATABASE_URL": pg.url_on(links[f"pg-{client}"].a_addr, "tandem"),
                "TANDEM_REDIS_URL": f"redis://{links[f'redis-{client}'].a_addr}:{redis_port}/0",
            }
            hosts[client] = infra.Processes(env, logs)
            cleanup.callback(hosts[client].stop_all)

        from services.api.auth import create_key
        from services.storage.db import transaction

        with transaction(database_url) as session:
            key = create_key(session, "netns")
        dispose_engines()
        port = infra.free_port()
        api_host = links["host-api"].a_addr
        stack = Stack(lab, database_url, hosts, netns, f"http://{api_host}:{port}", key)
        for queue in QUEUES:
            stack.start_worker(queue)
        stack.start_reconciler()
        hosts["api"].api(port, host=api_host, netns=netns["api"])
        yield stack
        dispose_engines()


# --- what a scenario measures ---------------------------------------------------------------


@dataclass
class Timeline:
    """Seconds from the scenario's start; printed at its end."""

    name: str
    started: float = field(default_factory=time.monotonic)
    outage: tuple[float, float] | None = None
    first_stage_after: float | None = None  # first stage recorded after the link came back
    all_finished: float | None = None
    jobs: int = 0
    stages: int = 0
    duplicates: int = 0
    notes: list[str] = field(default_factory=list)

    def now(self) -> float:
        return round(time.monotonic() - self.started, 2)

    def report(self, restarts: list[str]) -> str:
        down, up = self.outage or (None, None)
        recovery = None if self.first_stage_after is None else round(self.first_stage_after - up, 2)
        lines = [
            f"[{self.name}] outage {down}s -> {up}s; first stage recorded after the link came "
            f"back: +{recovery}s; all {self.jobs} jobs finished at {self.all_finished}s "
            f"(+{None if self.all_finished is None else round(self.all_finished - up, 2)}s); "
            f"{self.stages} stages, {self.duplicates} recorded twice; "
            f"supervisor restarts: {restarts or 'none'}",
            *(f"    {note}" for note in self.notes),
        ]
        return "\n".join(lines)


def outage(stack: Stack, timeline: Timeline, link: str, seconds: float, ids: list[str]) -> None:
    """Take `link` down for `seconds`; keep the supervisor going; note when stages resume."""
    before = stack.stage_count(ids)
    down = timeline.now()
    stack.lab.set_link(link, up=False)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            stack.supervise()
            time.sleep(0.5)
    finally:
        stack.lab.set_link(link, up=True)
    up = timeline.now()
    timeline.outage = (down, up)
    timeline.notes.append(
        f"stages recorded during the outage: {stack.stage_count(ids) - before}"
    )


def wait_finished(
    stack: Stack, timeline: Timeline, ids: list[str], timeout: float
) -> dict[str, str]:
    at_up = stack.stage_count(ids)
    deadline = time.monotonic() + timeout
    while True:
        stack.supervise()
        statuses = stack.statuses(ids)
        if timeline.first_stage_after is None and stack.stage_count(ids) > at_up:
            timeline.first_stage_after = timeline.now()
        if all(statuses.get(i) in FINAL for i in ids):
            timeline.all_finished = timeline.now()
            if timeline.first_stage_after is None:  # (the last stage was recorded before)
                timeline.first_stage_after = timeline.all_finished
            return statuses
        if time.monotonic() > deadline:
            counts = {s: list(statuses.values()).count(s) for s in set(statuses.values())}
            raise AssertionError(
                f"{timeline.name}: jobs unfinished after {timeout:.0f}s: {counts}\n{stack.logs()}"
            )
        time.sleep(0.25)


def check_jobs(stack: Stack, timeline: Timeline, kinds: dict[str, tuple]) -> None:
    """Every job succeeded; no stage twice; each job's stages are the embedded run's."""
    ids = list(kinds)
    statuses = stack.statuses(ids)
    failed = {i: s for i, s in statuses.items() if s != "succeeded"}
    errors = stack.query("SELECT id, error FROM jobs WHERE id = ANY(:ids)", ids=list(failed))
    assert not failed, f"{timeline.name}: {len(failed)} jobs did not succeed: {errors[:3]}"
    total, distinct = stack.query(
        "SELECT count(*), count(DISTINCT (job_id, seq)) FROM stages WHERE job_id = ANY(:ids)",
        ids=ids,
    )[0]
    timeline.jobs, timeline.stages, timeline.duplicates = len(ids), total, total - distinct
    assert total == distinct, f"{timeline.name}: {total - distinct} stages recorded twice"
    rows = stack.query(
        f"SELECT job_id, {', '.join(COMPARED)} FROM stages WHERE job_id = ANY(:ids) "
        "ORDER BY job_id, seq",
        ids=ids,
    )
    recorded: dict[str, list[dict]] = {job_id: [] for job_id in ids}
    for row in rows:
        recorded[row.job_id].append(dict(zip(COMPARED, row[1:], strict=True)))
    for job_id, kind in kinds.items():
        assert recorded[job_id] == expected_stages(kind), (timeline.name, job_id, kind[0])


_EXPECTED: dict[str, list[dict]] = {}


def expected_stages(kind: tuple) -> list[dict]:
    """The job's stages run embedded, in this process (greedy decoding: deterministic)."""
    label = json.dumps(kind, sort_keys=True)
    if label not in _EXPECTED:
        from services.core.engines import Engines
        from services.core.requests import parse_job_request
        from services.core.runner import run_job
        from services.settings import Settings

        strategy, params = kind
        request = parse_job_request(
            {"question": QUESTION, "strategy": strategy, "params": params}, 8000
        )
        engines = Engines(Settings(local_threads=1, local_max_batch=4))
        try:
            stages = run_job(request, engines).stages
        finally:
            engines.close()
        _EXPECTED[label] = [{name: getattr(s, name) for name in COMPARED} for s in stages]
    return _EXPECTED[label]


def submit(client: httpx.Client, kind: tuple) -> str:
    strategy, params = kind
    response = client.post(
        "/v1/jobs", json={"question": QUESTION, "strategy": strategy, "params": params}
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_until(check: Callable[[], bool], timeout: float, what: str, stack: Stack) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        stack.supervise()
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{stack.logs()}"
        time.sleep(0.2)


# --- 1. workers cut off from Redis in the middle of a batch ---------------------------------


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.timeout(900)
def test_workers_cut_off_from_redis_mid_batch(stack: Stack) -> None:
    timeline = Timeline("workers x Redis, 30 s, mid-batch")
    kinds = [TANDEM if n % 3 == 0 else SLM for n in range(30)]
    lines = [
        json.dumps(
            {"custom_id": f"c{n}", "question": QUESTION, "strategy": k[0], "params": k[1]}
        )
        for n, k in enumerate(kinds)
    ]
    with stack.http() as client:
        response = client.post(
            "/v1/batches",
            content="\n".join(lines),
            headers={"Content-Type": "application/jsonl"},
        )
        assert response.status_code == 202, response.text
        batch_id = response.json()["id"]
    rows = stack.query("SELECT id, line FROM jobs WHERE batch_id = :b", b=batch_id)
    by_id = {row.id: kinds[row.line - 1] for row in rows}
    ids = list(by_id)
    assert len(ids) == len(kinds)

    def midway() -> bool:
        done = sum(status in FINAL for status in stack.statuses(ids).values())
        return done >= 3
    wait_until(midway, 300, "the batch to get going", stack)
    unfinished = sum(status not in FINAL for status in stack.statuses(ids).values())
    timeline.notes.append(f"unfinished when the link went down: {unfinished} of {len(ids)}")
    assert unfinished >= 5, "the batch finished before the fault; nothing was tested"

    outage(stack, timeline, "redis-work", 30, ids)
    wait_finished(stack, timeline, ids, timeout=420)
    check_jobs(stack, timeline, by_id)
    with stack.http() as client:
        batch = client.get(f"/v1/batches/{batch_id}").json()
    assert batch["status"] == "completed", batch["status"]
    assert batch["request_counts"]["completed"] == len(ids)
    print("\n" + timeline.report(stack.restarts))


# --- 2. workers cut off from Postgres in the middle of stages -------------------------------


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.timeout(900)
def test_workers_cut_off_from_postgres_mid_stage(stack: Stack) -> None:
    timeline = Timeline("workers x Postgres, 30 s, mid-stage")
    restarts_before = len(stack.restarts)
    kinds = [LONG if n % 3 else TANDEM for n in range(12)]
    with stack.http() as client:
        by_id = {submit(client, kind): kind for kind in kinds}
    ids = list(by_id)
    wait_until(lambda: stack.running_stages(ids) >= 2, 300, "stages to be running", stack)
    timeline.notes.append(f"stages running when the link went down: {stack.running_stages(ids)}")

    outage(stack, timeline, "pg-work", 30, ids)
    wait_finished(stack, timeline, ids, timeout=420)
    check_jobs(stack, timeline, by_id)
    reruns = stack.query(
        "SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND attempts > ("
        "SELECT count(*) FROM stages WHERE stages.job_id = jobs.id)",
        ids=ids,
    )[0][0]
    timeline.notes.append(f"jobs with a stage started more than once (fenced re-runs): {reruns}")
    print("\n" + timeline.report(stack.restarts[restarts_before:]))


# --- 3. the API cut off from Postgres ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.timeout(600)
def test_api_cut_off_from_postgres_answers_503_fast_and_recovers(stack: Stack) -> None:
    timeline = Timeline("API x Postgres, 10 s")
    restarts_before = len(stack.restarts)
    results: list[tuple[float, int, float, str, str]] = []
    stop = threading.Event()

    def submitter() -> None:
        with stack.http(timeout=60) as client:
            body = {"question": QUESTION, "strategy": SLM[0], "params": SLM[1]}
            infra.keep_submitting(client, body, stop, results, timeline.now, idempotent=True)

    thread = threading.Thread(target=submitter, daemon=True)
    thread.start()
    try:
        time.sleep(4)
        down = timeline.now()
        stack.lab.set_link("pg-api", up=False)
        time.sleep(10)
        stack.lab.set_link("pg-api", up=True)
        up = timeline.now()
        timeline.outage = (down, up)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            r[1] == 202 and r[0] > up for r in results
        ):
            time.sleep(0.25)
        time.sleep(2)
    finally:
        stop.set()
        thread.join(90)

    during = [r for r in results if down + 0.5 < r[0] < up - 0.5]
    failed = [r for r in results if r[1] != 202]
    assert {r[1] for r in results} <= {202, 503}, [r[1:] for r in failed if r[1] != 503][:3]
    shown = [(r[0], r[1], round(r[2], 2)) for r in results]
    assert during and all(r[1] == 503 for r in during), (down, up, shown)
    for _, _, elapsed, kind, body in failed:
        assert elapsed < 5.5, f"a failed submission took {elapsed:.1f}s"
        assert kind.startswith("application/problem+json"), kind
        assert json.loads(body)["status"] == 503
    recovered = [r for r in results if r[1] == 202 and r[0] > up]
    assert recovered, "the API did not accept jobs again after the link came back"
    timeline.first_stage_after = recovered[0][0]  # here: the first job accepted again
    accepted = [json.loads(r[4])["id"] for r in results if r[1] == 202]
    wait_finished(stack, timeline, accepted, timeout=300)
    check_jobs(stack, timeline, dict.fromkeys(accepted, SLM))
    worst = max((r[2] for r in failed), default=0.0)
    timeline.notes.append(
        f"{len(results)} submissions: {len(accepted)} accepted, {len(failed)} answered 503 "
        f"(slowest {worst:.2f}s); accepted again {recovered[0][0] - up:.2f}s after the link "
        "came back (the 'first stage' figure above is that first acceptance)"
    )
    print("\n" + timeline.report(stack.restarts[restarts_before:]))


# --- the fix scenario 1 needed, on its own (fast) ----------------------------------------------


@pytest.mark.parametrize("transport", ["workers.transport:Transport", "redis"])
def test_an_ack_redis_never_heard_still_frees_its_prefetch_slot(transport: str) -> None:
    """With kombu's own Redis transport ("redis") a failed ack keeps its prefetch slot
    forever (a worker with every slot so held never consumes again); with ours the slot is
    freed, and the message stays in Redis's unacked index for redelivery."""
    from kombu import Connection, Producer, Queue

    with (
        infra.throwaway_redis() as (url, server),
        Connection(f"{url}/0", transport=transport) as connection,
    ):
        channel = connection.channel()
        channel.basic_qos(0, 1, False)
        Queue("stage", channel=channel).declare()
        Producer(channel).publish({"job": 1}, routing_key="stage")
        message = channel.basic_get("stage")
        assert message is not None and not channel.qos.can_consume()
        server.kill()
        server.wait(10)
        with pytest.raises(connection.connection_errors):
            message.ack()
        assert channel.qos.can_consume() is (transport != "redis")
