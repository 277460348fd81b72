"""Faults with the real processes (API, one Celery worker per queue, reconciler) against
real Postgres and Redis and the default model: workers SIGKILLed at random, Redis restarted
empty, Postgres stopped mid-submission, an unreachable model server, a stage that kills its
worker every time. Each test has its own database and Redis, tiny model work per job and a
pytest timeout; what each one proves is in docs/operations.md.

Also here (fast): every metric the Grafana dashboard queries exists in the code."""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests import infra

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
QUEUES = ("coordinator", "classifier", "executor")
# Tiny model work: one executor stage of 2 tokens, or a Tandem job through all three queues
# (classifier, coordinator for 4 tokens, executor for 4 tokens).
SLM = ("slm_only", {"executor_max_tokens": 2})
TANDEM = ("tandem", {"budgets": [0, 4], "executor_max_tokens": 4, "cost_preference": "quality"})
FINAL = ("succeeded", "failed", "cancelled")
DEADLINE_S = 4
COMPARED = ("seq", "kind", "role", "model", "prompt_tokens", "generated_tokens", "tflops")


# --- the stack under test -----------------------------------------------------------------


class Services:
    """The service's processes on one database and one Redis, and a client of its API."""

    def __init__(self, log_dir: Path, database_url: str, redis_url: str, **env: str) -> None:
        self.database_url = database_url
        self.env = {
            "TANDEM_DATABASE_URL": database_url,
            "TANDEM_REDIS_URL": redis_url,
            "TANDEM_STAGE_DEADLINE_S": str(DEADLINE_S),
            "TANDEM_MAX_STAGE_ATTEMPTS": "10",
            "TANDEM_LOCAL_MAX_BATCH": "4",
            "TANDEM_LOCAL_THREADS": "1",
            "TANDEM_RATE_LIMIT_PER_MINUTE": "0",
            "TANDEM_LOG_LEVEL": "INFO",
            **env,
        }
        self.processes = infra.Processes(self.env, log_dir)
        self.restarted: list[tuple[str, str]] = []
        self.key = self._create_key()
        self.port = infra.free_port()
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=30,
        )

    def _create_key(self) -> str:
        from services.api.auth import create_key
        from services.storage.db import transaction

        with transaction(self.database_url) as session:
            return create_key(session, "faults")

    def start(
        self, queues=QUEUES, concurrency: int = 4, worker_env: dict[str, str] | None = None
    ) -> Services:
        for queue in queues:
            self.worker(queue, concurrency)
        self.processes.start(
            "reconciler", [str(infra.BIN / "tandem"), "reconcile", "--interval", "1"]
        )
        self.processes.api(self.port)
        return self

    def worker(self, queue: str, concurrency: int = 4) -> None:
        self.processes.worker(queue, concurrency)

    def supervise(self, _statuses=None) -> None:
        """What compose's `restart: unless-stopped` and Kubernetes do for a worker that
        exited: start it again (and remember it, so a test can report it)."""
        for queue in QUEUES:
            process = self.processes.running.get(queue)
            if process is not None and process.poll() is not None:
                self.restarted.append((queue, self.processes.log(queue)[-300:]))
                self.processes.running.pop(queue)
                self.worker(queue)

    def restart_worker(self, queue: str, concurrency: int = 4) -> None:
        """SIGKILL the queue's worker (and its threads mid-stage) and start a new one."""
        self.processes.kill(queue, signal.SIGKILL)
        self.worker(queue, concurrency)

    def submit(self, strategy_params=SLM, question: str = QUESTION) -> httpx.Response:
        strategy, params = strategy_params
        body = {"question": question, "strategy": strategy, "params": params}
        return self.http.post("/v1/jobs", json=body)

    def stop(self) -> None:
        self.http.close()
        self.processes.stop_all()

    # Postgres, read directly: the source of truth.
    def query(self, sql: str, **params) -> list:
        return infra.query(self.database_url, sql, **params)

    def statuses(self, ids: list[str]) -> dict[str, str]:
        rows = self.query("SELECT id, status FROM jobs WHERE id = ANY(:ids)", ids=ids)
        return dict(rows)

    def errors(self, ids: list[str]) -> dict[str, str]:
        """Why jobs that did not succeed ended (or their last error)."""
        rows = self.query(
            "SELECT id, status || ': ' || coalesce(error, '') FROM jobs "
            "WHERE id = ANY(:ids) AND status <> 'succeeded'",
            ids=ids,
        )
        return dict(rows)

    def wait_finished(
        self, ids: list[str], timeout: float, tick: Callable[[dict[str, str]], None] | None = None
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            statuses = self.statuses(ids)
            unfinished = [i for i in ids if statuses.get(i) not in FINAL]
            if not unfinished:
                return statuses
            if time.monotonic() > deadline:
                logs = {name: self.processes.log(name)[-1500:] for name in self.processes.running}
                counts = {s: list(statuses.values()).count(s) for s in set(statuses.values())}
                raise AssertionError(
                    f"{len(unfinished)} of {len(ids)} jobs unfinished after {timeout:.0f}s "
                    f"({counts}); logs: {logs}"
                )
            if tick:
                tick(statuses)
            time.sleep(0.25)

    def assert_each_stage_once(self, ids: list[str]) -> dict[str, list]:
        """No stage recorded twice; seqs contiguous from 0. Returns the stages by job."""
        total, distinct = self.query(
            "SELECT count(*), count(DISTINCT (job_id, seq)) FROM stages WHERE job_id = ANY(:ids)",
            ids=ids,
        )[0]
        assert total == distinct, f"{total - distinct} stages recorded twice"
        rows = self.query(
            f"SELECT job_id, {', '.join(COMPARED)}, prefill_tflops, cached_prompt_tokens"
            " FROM stages WHERE job_id = ANY(:ids) ORDER BY job_id, seq",
            ids=ids,
        )
        by_job: dict[str, list] = {job_id: [] for job_id in ids}
        for row in rows:
            by_job[row.job_id].append(row)
        for job_id, stages in by_job.items():
            assert [s.seq for s in stages] == list(range(len(stages))), job_id
        return by_job

    def scrape(self, port: int) -> str:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


@pytest.fixture
def fresh_database(postgres_admin_url: str) -> Iterator[str]:
    """A migrated database of the test's own (no other test's jobs for its reconciler)."""
    from services.storage.db import upgrade

    with infra.scratch_database(postgres_admin_url) as url:
        upgrade(url)
        yield url


@contextlib.contextmanager
def running(services: Services, **start) -> Iterator[Services]:
    try:
        yield services.start(**start)
    finally:
        services.stop()


def embedded_stages(strategy_params) -> list[dict]:
    """The same job run in this process: what each stage must cost."""
    from services.core.engines import Engines
    from services.core.requests import parse_job_request
    from services.core.runner import run_job
    from services.settings import Settings

    strategy, params = strategy_params
    request = parse_job_request(
        {"question": QUESTION, "strategy": strategy, "params": params}, 8000
    )
    engines = Engines(Settings(local_threads=1, local_max_batch=4))
    try:
        result = run_job(request, engines)
    finally:
        engines.close()
    return [{name: getattr(stage, name) for name in COMPARED} for stage in result.stages]


def metric_value(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(?:\{\})?")
    found = re.search(rf"^{pattern} (?P<value>[0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group("value")) if found else 0.0


# --- 1. workers SIGKILLed at random -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.timeout(1500)
def test_workers_sigkilled_at_random_lose_nothing_and_record_each_stage_once(
    fresh_database: str, tmp_path: Path
) -> None:
    kinds = [TANDEM if n % 5 == 0 else SLM for n in range(100)]  # 20 through all 3 queues
    rng = random.Random(9)
    kills: list[tuple[str, int]] = []
    with contextlib.ExitStack() as stack:
        redis_url, _ = stack.enter_context(infra.throwaway_redis())
        s = stack.enter_context(running(Services(tmp_path, fresh_database, f"{redis_url}/0")))
        ids = []
        for kind in kinds:
            response = s.submit(kind)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        strategy_of = dict(zip(ids, kinds, strict=True))
        # Kill as the run progresses (not on a clock), so a fast machine sees as many kills.
        kill_at = [5, 15, 25, 35, 45, 55, 65, 75]  # jobs finished

        def killer(statuses: dict[str, str]) -> None:
            finished = sum(status in FINAL for status in statuses.values())
            if len(kills) >= len(kill_at) or finished < kill_at[len(kills)]:
                return
            running_now = list(statuses.values()).count("running")
            queue = rng.choice(("executor", "executor", "classifier", "coordinator"))
            s.restart_worker(queue)
            kills.append((queue, running_now))

        statuses = s.wait_finished(ids, timeout=1200, tick=killer)
        failed = {
            i: s.query("SELECT error FROM jobs WHERE id=:i", i=i)[0][0]
            for i in ids
            if statuses[i] != "succeeded"
        }
        assert not failed, f"{len(failed)} jobs did not succeed: {list(failed.values())[:3]}"
        assert len(kills) >= 3, f"only {len(kills)} kills happened during the run"

        stages = s.assert_each_stage_once(ids)
        expected = {kind[0]: embedded_stages(kind) for kind in (SLM, TANDEM)}
        for job_id in ids:
            recorded = stages[job_id]
            # The same stages (and so the same cost) as the job run embedded, once each.
            assert [dict(zip(COMPARED, row[1:8], strict=True)) for row in recorded] == [
                {**stage, "tflops": pytest.approx(stage["tflops"])}
                for stage in expected[strategy_of[job_id][0]]
            ], job_id
        for job_id in ids[:10] + ids[-10:]:
            cost = s.http.get(f"/v1/jobs/{job_id}").json()["cost"]
            recorded = stages[job_id]
            assert cost["generated_tokens"] == sum(row.generated_tokens for row in recorded)
            assert cost["prompt_tokens"] == sum(row.prompt_tokens for row in recorded)
            assert cost["tflops"] == pytest.approx(sum(row.tflops for row in recorded))
        n_stages = sum(len(v) for v in stages.values())
        print(f"\n100 jobs, {len(kills)} SIGKILLs {kills}, {n_stages} stages, 0 duplicated")


def _on(services: Services, redis_url: str) -> Services:
    """Point the services at a Redis known only once it runs."""
    services.env["TANDEM_REDIS_URL"] = f"{redis_url}/0"
    services.processes.env["TANDEM_REDIS_URL"] = f"{redis_url}/0"
    return services


# --- 2. Redis restarted (empty) mid-run ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.timeout(900)
def test_redis_restarted_mid_run_loses_no_job(fresh_database: str, tmp_path: Path) -> None:
    port = infra.free_port()
    metrics_port = infra.free_port()
    services = Services(tmp_path, fresh_database, "")
    kinds = [TANDEM if n % 4 == 0 else SLM for n in range(40)]
    with contextlib.ExitStack() as stack:
        redis_url, first = stack.enter_context(infra.throwaway_redis(port))
        _on(services, redis_url)
        services.processes.env["TANDEM_METRICS_PORT"] = str(metrics_port)  # the reconciler's
        stack.enter_context(running(services, queues=()))
        services.processes.env["TANDEM_METRICS_PORT"] = "0"
        for queue in QUEUES:
            services.worker(queue)
        ids = []
        for kind in kinds:
            response = services.submit(kind)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        # Once one job is done, take Redis away with whatever it held (queued messages,
        # unacked ones, the next stages being published) and bring up an empty one.
        deadline = time.monotonic() + 300
        while "succeeded" not in (before := services.statuses(ids)).values():
            assert time.monotonic() < deadline, "no job succeeded before the restart"
            time.sleep(0.1)
        first.kill()
        first.wait(10)
        # Meanwhile a submission is refused at once: 503, nothing half-accepted.
        started = time.monotonic()
        refused = services.submit(SLM)
        assert refused.status_code == 503, refused.text
        assert time.monotonic() - started < 5
        assert refused.headers["content-type"].startswith("application/problem+json")
        time.sleep(1)
        stack.enter_context(infra.throwaway_redis(port))
        unfinished = [i for i in ids if before[i] not in FINAL]
        assert unfinished, "every job finished before Redis went away; nothing was tested"

        statuses = services.wait_finished(ids, timeout=600, tick=services.supervise)
        assert set(statuses.values()) == {"succeeded"}, services.errors(ids)
        services.assert_each_stage_once(ids)
        requeued = metric_value(services.scrape(metrics_port), "tandem_reconciler_requeued_total")
        assert requeued >= 1, "the reconciler re-enqueued nothing"
        print(
            f"\n{len(ids)} jobs, {len(unfinished)} unfinished when Redis restarted, "
            f"{requeued:.0f} re-enqueued by the reconciler, all succeeded, 0 duplicated stages; "
            f"workers restarted by the supervisor: {services.restarted or 'none'}"
        )


# --- 3. Postgres stopped for 10 s during submission -----------------------------------------


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.timeout(900)
def test_postgres_outage_answers_503_quickly_and_recovers(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, text

    from services.storage.db import dispose_engines, upgrade

    pg = infra.ThrowawayPostgres()
    with contextlib.ExitStack() as stack:
        stack.enter_context(pg)
        admin = create_engine(pg.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text("CREATE DATABASE tandem"))
        admin.dispose()
        url = pg.admin_url.rsplit("/", 1)[0] + "/tandem"
        upgrade(url)
        redis_url, _ = stack.enter_context(infra.throwaway_redis())
        services = Services(tmp_path, url, f"{redis_url}/0")
        dispose_engines()  # no pooled connection of this process outlives the outage
        stack.enter_context(running(services))

        results: list[tuple[float, int, float, str, str]] = []
        stop = threading.Event()

        def submitter() -> None:
            with httpx.Client(
                base_url=str(services.http.base_url),
                headers=dict(services.http.headers),
                timeout=30,
            ) as client:
                body = {"question": QUESTION, "strategy": SLM[0], "params": SLM[1]}
                infra.keep_submitting(client, body, stop, results)

        thread = threading.Thread(target=submitter, daemon=True)
        thread.start()
        time.sleep(5)
        down_at = time.monotonic()
        pg.stop("fast")
        time.sleep(10)
        pg.start()
        up_at = time.monotonic()
        deadline = up_at + 60
        while time.monotonic() < deadline:
            if any(r[1] == 202 and r[0] > up_at for r in results):
                break
            time.sleep(0.5)
        time.sleep(3)
        stop.set()
        thread.join(40)

        during = [r for r in results if down_at + 0.5 < r[0] < up_at - 0.5]
        after = [r for r in results if r[0] > up_at]
        statuses = {r[1] for r in results}
        assert statuses <= {202, 503}, [r for r in results if r[1] not in (202, 503)][:3]
        failed = [r for r in results if r[1] == 503]
        assert during and all(r[1] == 503 for r in during), [r[1] for r in during]
        for _, _, elapsed, kind, body in failed:
            assert elapsed < 5.5, f"a failed submission took {elapsed:.1f}s"
            assert kind.startswith("application/problem+json")
            assert json.loads(body)["status"] == 503
        recovered = [r for r in after if r[1] == 202]
        assert recovered, "the API did not accept jobs again after Postgres came back"
        recovery_s = recovered[0][0] - up_at

        accepted = [json.loads(r[4])["id"] for r in results if r[1] == 202]
        statuses_by_id = services.wait_finished(accepted, timeout=600)
        assert set(statuses_by_id.values()) == {"succeeded"}, statuses_by_id
        services.assert_each_stage_once(accepted)
        worst = max(r[2] for r in failed)
        print(
            f"\n{len(results)} submissions: {len(accepted)} accepted (all succeeded), "
            f"{len(failed)} answered 503 (slowest {worst:.2f}s); accepting again "
            f"{recovery_s:.1f}s after Postgres came back"
        )
        dispose_engines()


# --- 4. the model server is unreachable ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_unreachable_model_server_fails_the_job_naming_the_url(
    fresh_database: str, tmp_path: Path
) -> None:
    closed = infra.free_port()
    url = f"http://127.0.0.1:{closed}"
    metrics_port = infra.free_port()
    with infra.throwaway_redis() as (redis_url, _):
        services = Services(
            tmp_path,
            fresh_database,
            f"{redis_url}/0",
            TANDEM_EXECUTOR_BACKEND="sglang",
            TANDEM_EXECUTOR_URL=url,
            TANDEM_EXECUTOR_PARAMS="135000000",
            TANDEM_HTTP_RETRIES="1",
            TANDEM_HTTP_CONNECT_TIMEOUT_S="1",
            TANDEM_MAX_STAGE_ATTEMPTS="2",
        )
        with running(services, queues=()):
            services.processes.env["TANDEM_METRICS_PORT"] = str(metrics_port)
            services.worker("executor")
            started = time.monotonic()
            job = services.submit(SLM).json()
            services.wait_finished([job["id"]], timeout=300)
            took = time.monotonic() - started
            done = services.http.get(f"/v1/jobs/{job['id']}").json()
            assert done["status"] == "failed"
            assert url in done["error"], done["error"]
            assert "stage 0 (executor) did not complete after 2 attempts" in done["error"]
            assert "unreachable" in done["error"]
            assert done["stages"] == []
            attempts = services.query("SELECT attempts FROM jobs WHERE id=:i", i=job["id"])[0][0]
            time.sleep(3 * DEADLINE_S)  # nothing keeps retrying after the job failed
            again = services.query("SELECT attempts, status FROM jobs WHERE id=:i", i=job["id"])
            assert tuple(again[0]) == (attempts, "failed")
            retries = metric_value(
                services.scrape(metrics_port),
                "tandem_stage_retries_total",
                'queue="executor"',
            )
            assert retries == 2  # one redelivery per failed attempt, none after the cap
            print(f"\nfailed after {took:.1f}s, {retries:.0f} retries: {done['error']}")


# --- 5. a stage that kills its worker every time ------------------------------------------


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.timeout(900)
def test_a_stage_that_always_kills_its_worker_fails_after_the_cap(
    fresh_database: str, tmp_path: Path
) -> None:
    cap = 3
    with infra.throwaway_redis() as (redis_url, _):
        services = Services(
            tmp_path, fresh_database, f"{redis_url}/0", TANDEM_MAX_STAGE_ATTEMPTS=str(cap)
        )
        with running(services, queues=("executor",)):
            job_id = services.submit(("slm_only", {"executor_max_tokens": 64})).json()["id"]
            kills, seen = 0, 0
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                status, attempts = services.query(
                    "SELECT status, attempts FROM jobs WHERE id=:i", i=job_id
                )[0]
                if status in FINAL:
                    break
                if attempts > seen:  # the stage was claimed: crash its worker
                    services.restart_worker("executor")
                    kills, seen = kills + 1, attempts
                time.sleep(0.05)
            status, attempts, error = services.query(
                "SELECT status, attempts, error FROM jobs WHERE id=:i", i=job_id
            )[0]
            assert status == "failed", (status, attempts, error)
            assert f"did not complete after {cap} attempts" in error, error
            assert "worker lost" in error
            assert kills == cap
            time.sleep(3 * (DEADLINE_S + 1))  # the reconciler leaves a failed job alone
            assert services.query("SELECT status, attempts FROM jobs WHERE id=:i", i=job_id)[0] == (
                "failed",
                attempts,
            )
            assert services.query("SELECT count(*) FROM stages WHERE job_id=:i", i=job_id) == [(0,)]
            print(f"\n{kills} SIGKILLs, then: {error}")


# --- the broker lost between admission and enqueue (fast) ----------------------------------


def test_job_committed_before_the_broker_failed_is_accepted_and_reconciled(
    in_process_settings, fresh_database: str
) -> None:
    """Redis can vanish after the admission check passed and the job row committed: the
    client gets its 202 (not a 500 inviting a duplicate), and the reconciler queues the job."""
    from services.api import create_app
    from services.api.auth import create_key
    from services.jobs import reconcile
    from services.storage.db import transaction

    def broken(_tasks) -> None:
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    config = in_process_settings.model_copy(update={"database_url": fresh_database})
    with transaction(fresh_database) as session:
        key = create_key(session, "faults")
    client = create_app(config, enqueue=broken).test_client()
    response = client.post(
        "/v1/jobs",
        json={"question": QUESTION, "strategy": SLM[0], "params": SLM[1]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 202, response.get_data(as_text=True)
    job_id = response.get_json()["id"]
    queued: list = []
    assert reconcile(config, queued.extend, deadline_s=0) == 1
    assert [(task.job_id, task.seq, task.queue) for task in queued] == [(job_id, 0, "executor")]


# --- the dashboard cannot rot ---------------------------------------------------------------

METRIC_SOURCES = ("services/observability.py", "services/api/metrics.py")
METRIC_KINDS = ("Counter", "Histogram", "Gauge", "Summary", "GaugeMetricFamily")


def declared_metrics() -> dict[str, set[str]]:
    """Sample names the code exposes, with the labels each carries."""
    import ast

    names: dict[str, set[str]] = {}
    for source in METRIC_SOURCES:
        for node in ast.walk(ast.parse((ROOT / source).read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            if node.func.id not in METRIC_KINDS or not node.args:
                continue
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            labels: set[str] = set()
            label_nodes = [kw.value for kw in node.keywords if kw.arg in ("labels", "labelnames")]
            label_nodes += [a for a in node.args[2:3] if isinstance(a, ast.List | ast.Tuple)]
            for label_node in label_nodes:
                labels |= {e.value for e in label_node.elts if isinstance(e, ast.Constant)}
            name = first.value
            if node.func.id == "Histogram":
                for suffix in ("_bucket", "_count", "_sum"):
                    names[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
            elif node.func.id == "Counter":
                names[name if name.endswith("_total") else name + "_total"] = labels
            else:
                names[name] = labels
    return names


def dashboard_queries() -> list[str]:
    document = json.loads((ROOT / "dashboards/grafana.json").read_text())
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(document["panels"])
    return exprs


# What an SGLang server started with --enable-metrics exports, as the dashboard uses it
# (SGLang's "Production Metrics" reference).
SGLANG_METRICS = {
    "sglang:num_running_reqs",
    "sglang:num_queue_reqs",
    "sglang:token_usage",
    "sglang:prompt_tokens_total",
    "sglang:generation_tokens_total",
    "sglang:time_to_first_token_seconds_bucket",
}


def test_every_metric_in_the_dashboard_exists_in_the_code() -> None:
    declared = declared_metrics()
    assert "tandem_stage_seconds_bucket" in declared and "tandem_jobs" in declared
    queries = dashboard_queries()
    assert len(queries) >= 12
    used: set[str] = set()
    for expr in queries:
        served = set(re.findall(r"\b(sglang:[a-z0-9_]+)", expr))
        if served:  # the model servers' own metrics, by SGLang's names
            assert served <= SGLANG_METRICS, f"{expr!r} uses {sorted(served - SGLANG_METRICS)}"
            continue
        metrics = set(re.findall(r"\b(tandem_[a-z0-9_]+)", expr))
        assert metrics, f"no tandem metric in {expr!r}"
        unknown = metrics - set(declared)
        assert not unknown, f"{expr!r} uses {sorted(unknown)}, not defined in {METRIC_SOURCES}"
        used |= metrics
        # Labels matched on a metric, and grouped by, must be labels it has.
        for metric, matchers in re.findall(r"(tandem_[a-z0-9_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)", matchers):
                assert label in declared[metric], f"{metric} has no label {label!r}"
        labels_of_expr = set().union(*(declared[m] for m in metrics))
        for grouping in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in grouping.split(",")):
                assert label in labels_of_expr, f"{expr!r} groups by unknown label {label!r}"
    # Every metric family the code defines is on the dashboard.
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in declared}
    shown = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    assert families <= shown, f"not on the dashboard: {sorted(families - shown)}"
