"""Control-plane capacity at GPU speed, by simulation: do the queues keep a GPU busy?

Two simulated SGLang servers (`bench/sim_server.py`: coordinator on the `32b-h200` profile,
executor on `7b-h100`; stand-ins that take a GPU engine's time, not models) serve Tandem
jobs run two ways, in one run, for each number of jobs in flight (16, 64, 256):

1. through the whole stack: jobs submitted to the API (`tandem api`, 2 gunicorn processes),
   carried by Redis between the three Celery pools (real `celery worker` processes,
   `--pool threads`, high concurrency), recorded in Postgres (a throwaway cluster of its
   own), with the reconciler running; the workers' backends are `sglang` pointed at the
   simulators, the classifier scoring on the executor's simulator, chat templates found in
   a hub cache as in a deployment;
2. straight to the simulators: every model request the first run made (the simulators
   record them), replayed job by job, in order, by a plain asyncio client keeping the same
   number of jobs in flight, after the simulators' prefix caches are flushed.

Printed per level: jobs/s both ways and their ratio (bar: >= 0.90 at 64 in flight), stage
transitions/s, control-plane CPU seconds per 1,000 stage transitions (API, workers and
reconciler, from /proc of those processes and their children), peak Postgres connections
(pg_stat_activity sampled every 0.25 s), and the simulators' CPU. The driver polls job
status in Postgres, not through the API, so client polling is not counted.

    .venv/bin/python bench/capacity.py [--levels 16,64,256] [--jobs-per-slot 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import simulated
from tests import infra

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. How much more money does Betty need?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
]
TAG = re.compile(r"\[job (\w+)\]")
MODELS = {"coordinator": simulated.COORDINATOR_32B, "executor": simulated.EXECUTOR_7B}
FINISHED = ("succeeded", "failed", "cancelled")


@dataclass
class Run:
    jobs: int
    elapsed_s: float
    transitions: int = 0
    failed: int = 0
    control_cpu_s: float = 0.0
    sim_cpu_s: float = 0.0
    peak_connections: int = 0
    stops: Counter | None = None
    latencies: list[float] | None = None  # each job, submit to finish (stack)
    started_again: int = 0  # jobs with a stage recorded on a second start (redelivery, reconciler)
    requests: int = 0  # model requests the simulators served

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.elapsed_s


# --- CPU from /proc ---------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree_cpu_s(roots: list[int]) -> float:
    """CPU seconds (user + system) of `roots`, their live descendants, and their reaped
    children (cutime + cstime)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = int(fields[1])
    members, frontier = set(roots), list(roots)
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in members:
                members.add(child)
                frontier.append(child)
    ticks = 0
    for pid in members:
        fields = _stat(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
            if pid in roots:
                ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


# --- Postgres sampling ------------------------------------------------------------------


class ConnectionSampler(threading.Thread):
    def __init__(self, admin_url: str, database: str) -> None:
        super().__init__(daemon=True)
        from sqlalchemy import create_engine

        self.engine = create_engine(admin_url, pool_size=1)
        self.database = database
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        from sqlalchemy import text

        with self.engine.connect() as connection:
            while not self._halt.is_set():
                count = connection.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"),
                    {"d": self.database},
                ).scalar_one()
                connection.commit()
                self.peak = max(self.peak, int(count) - 1)  # not this sampler's own
                self._halt.wait(0.25)

    def stop(self) -> int:
        self._halt.set()
        self.join(5)
        self.engine.dispose()
        return self.peak


# --- through the stack ------------------------------------------------------------------


def run_stack(
    api_url: str, key: str, db_url: str, tags: list[str], in_flight: int, params: dict
) -> tuple[float, dict[str, str]]:
    """Keep `in_flight` jobs running until every tag was submitted and finished; the wall
    time and each tag's job id."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url, pool_size=1)
    client = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def submit(tag: str) -> tuple[str, str]:
        question = f"[job {tag}] {QUESTIONS[hash(tag) % len(QUESTIONS)]}"
        response = client.post("/v1/jobs", json={"question": question, "params": params})
        response.raise_for_status()
        return tag, response.json()["id"]

    ids: dict[str, str] = {}
    pending = list(tags)
    running: set[str] = set()
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool, engine.connect() as connection:
        while pending or running:
            room = in_flight - len(running)
            batch, pending = pending[:room], pending[room:]
            for tag, job_id in pool.map(submit, batch):
                ids[tag] = job_id
                running.add(job_id)
            time.sleep(0.1)
            if running:
                done = connection.execute(
                    text("SELECT id FROM jobs WHERE id = ANY(:ids) AND status = ANY(:s)"),
                    {"ids": list(running), "s": list(FINISHED)},
                ).scalars()
                running -= set(done)
                connection.commit()
    elapsed = time.perf_counter() - started
    client.close()
    engine.dispose()
    return elapsed, ids


def stack_outcome(db_url: str, ids: list[str], run: Run) -> None:
    """Stages recorded, failures, where Tandem stopped, latencies and re-claims."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    with engine.connect() as connection:
        run.transitions = connection.execute(
            text("SELECT count(*) FROM stages WHERE job_id = ANY(:ids)"), {"ids": ids}
        ).scalar_one()
        rows = connection.execute(
            text(
                "SELECT status, summary, "
                "extract(epoch FROM finished_at - created_at) FROM jobs WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        ).all()
    engine.dispose()
    run.failed = sum(1 for status, *_ in rows if status != "succeeded")
    run.stops = Counter(
        (summary if isinstance(summary, dict) else json.loads(summary or "{}")).get(
            "stopped_at_stage"
        )
        for _, summary, *_ in rows
    )
    run.latencies = sorted(float(latency or 0) for *_, latency in rows)
    with engine.connect() as connection:  # the jobs whose stage had to start again
        again = connection.execute(
            text(
                "SELECT j.id, s.seq, s.kind, s.attempt, "
                "extract(epoch FROM s.created_at - j.created_at), s.latency_s "
                "FROM jobs j JOIN stages s ON s.job_id = j.id "
                "WHERE j.id = ANY(:ids) AND j.id IN "
                "(SELECT job_id FROM stages WHERE job_id = ANY(:ids) AND attempt > 1) "
                "ORDER BY j.id, s.seq"
            ),
            {"ids": ids},
        ).all()
    engine.dispose()
    run.started_again = len({job_id for job_id, *_ in again})
    for job_id, seq, kind, attempt, at, latency in again[:40]:
        print(
            f"    started again {job_id}: stage {seq} {kind} (start {attempt}) recorded "
            f"{at:.1f} s after submit, its model call {latency:.2f} s",
            flush=True,
        )


# --- straight to the simulators ---------------------------------------------------------


def recorded_requests(sims: dict[str, str]) -> dict[str, list[tuple[float, str, str, dict]]]:
    """The model requests of the stack run, per job tag, in the order they arrived."""
    per_job: dict[str, list[tuple[float, str, str, dict]]] = defaultdict(list)
    for role, url in sims.items():
        for entry in httpx.get(f"{url}/sim/log", params={"clear": 1}, timeout=120).json():
            body = entry["body"]
            found = TAG.search(str(body.get("prompt", "")))
            if found:  # probes (tokenize "") and other untagged calls are not a job's work
                per_job[found.group(1)].append((entry["t"], role, entry["path"], body))
    for requests in per_job.values():
        requests.sort(key=lambda r: r[0])
    return per_job


async def run_direct(
    sims: dict[str, str], per_job: dict[str, list], tags: list[str], in_flight: int
) -> float:
    """Replay each job's requests in order, `in_flight` jobs at a time. aiohttp, not
    httpx: at 256 concurrent requests httpx's async pool costs ~17 ms of CPU a request
    (measured here), which would make this baseline client-bound; aiohttp ~0.3 ms."""
    import aiohttp

    queue: asyncio.Queue[str] = asyncio.Queue()
    for tag in tags:
        queue.put_nowait(tag)
    connector = aiohttp.TCPConnector(limit=2 * in_flight)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            while not queue.empty():
                tag = queue.get_nowait()
                for _, role, path, body in per_job.get(tag, []):
                    async with session.post(f"{sims[role]}{path}", json=body) as response:
                        response.raise_for_status()
                        await response.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return time.perf_counter() - started


# --- setup ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="16,64,256", help="jobs in flight, comma-separated")
    parser.add_argument(
        "--jobs-per-slot", type=float, default=2.0, help="jobs per level / in flight"
    )
    parser.add_argument("--min-jobs", type=int, default=48)
    parser.add_argument("--budgets", default="0,100,500")
    parser.add_argument("--executor-max-tokens", type=int, default=512)
    parser.add_argument("--worker-concurrency", type=int, default=0, help="default: max level")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    concurrency = args.worker_concurrency or max(levels)
    params = {
        "budgets": [int(x) for x in args.budgets.split(",")],
        "executor_max_tokens": args.executor_max_tokens,
        "policy": "entropy",
        "cost_preference": "balanced",
    }
    work = Path(tempfile.mkdtemp(prefix="tandem-capacity-"))
    print(
        f"capacity at GPU speed (simulated servers: coordinator "
        f"{MODELS['coordinator'].profile}, executor {MODELS['executor'].profile}); "
        f"Tandem jobs, budgets {params['budgets']}, "
        f"executor max {params['executor_max_tokens']} tokens; workers --pool threads "
        f"--concurrency {concurrency}; logs in {work}",
        flush=True,
    )
    sims: dict = {}
    sim_urls: dict[str, str] = {}
    with infra.ThrowawayPostgres() as pg, infra.redis_server() as redis_url:
        admin = pg.admin_url
        with infra.scratch_database(admin) as db:
            from services.storage.db import upgrade

            upgrade(db)
            database = db.rsplit("/", 1)[1]
            env = {
                "TANDEM_DATABASE_URL": db,
                "TANDEM_REDIS_URL": redis_url,
                "TANDEM_LOG_LEVEL": "WARNING",
                "TANDEM_MAX_ACTIVE_JOBS": "0",
                "TANDEM_RATE_LIMIT_PER_MINUTE": "0",
            }
            processes = infra.Processes(env, work)
            try:
                for role, model in MODELS.items():
                    sims[role], sim_urls[role] = simulated.serve(
                        processes, role, model, work / "hub", "--record"
                    )
                for queue in ("coordinator", "classifier", "executor"):
                    processes.worker(queue, concurrency=concurrency)
                api_port = infra.free_port()
                processes.start(
                    "api",
                    [str(infra.BIN / "tandem"), "api", "--port", str(api_port), "--workers", "2",
                     "--threads", "16"],
                )  # fmt: skip
                processes.start("reconciler", [str(infra.BIN / "tandem"), "reconcile"])
                api_url = f"http://127.0.0.1:{api_port}"
                infra.wait_for(
                    lambda: httpx.get(f"{api_url}/healthz").status_code == 200, 60, "the API"
                )
                key = _api_key(db)
                control = [
                    processes.running[n].pid
                    for n in ("api", "coordinator", "classifier", "executor", "reconciler")
                ]
                sim_pids = [p.pid for p in sims.values()]
                # Warm up: every worker finds its template and opens its connections.
                run_stack(api_url, key, db, ["warm0", "warm1"], 2, params)
                recorded_requests(sim_urls)
                results = []
                for level in levels:
                    results.append(
                        measure(level, args, params, api_url, key, db, admin, database,
                                sim_urls, control, sim_pids)
                    )  # fmt: skip
            finally:
                processes.stop_all()
    report(results)


def measure(level, args, params, api_url, key, db, admin, database, sim_urls, control, sim_pids):
    n_jobs = max(args.min_jobs, int(level * args.jobs_per_slot))
    tags = [f"L{level}x{i}" for i in range(n_jobs)]
    for url in sim_urls.values():
        httpx.post(f"{url}/flush_cache")
        httpx.post(f"{url}/sim/reset")
        httpx.get(f"{url}/sim/log", params={"clear": 1}, timeout=120)
    sampler = ConnectionSampler(admin, database)
    sampler.start()
    cpu0, sim0 = tree_cpu_s(control), tree_cpu_s(sim_pids)
    elapsed, ids = run_stack(api_url, key, db, tags, level, params)
    cpu1, sim1 = tree_cpu_s(control), tree_cpu_s(sim_pids)
    peak = sampler.stop()
    stack = Run(n_jobs, elapsed, control_cpu_s=cpu1 - cpu0, sim_cpu_s=sim1 - sim0)
    stack.peak_connections = peak
    stack_outcome(db, list(ids.values()), stack)
    per_job = recorded_requests(sim_urls)
    stack.requests = sum(len(r) for r in per_job.values())
    transitions = stack.transitions
    for url in sim_urls.values():
        httpx.post(f"{url}/flush_cache")
    sim2, client0 = tree_cpu_s(sim_pids), time.process_time()
    direct_s = asyncio.run(run_direct(sim_urls, per_job, tags, level))
    direct = Run(n_jobs, direct_s, sim_cpu_s=tree_cpu_s(sim_pids) - sim2)
    direct.control_cpu_s = time.process_time() - client0  # the asyncio client's own
    requests = stack.requests
    print(
        f"  {level:>3} in flight: {n_jobs} jobs, {transitions} stages, {requests} model requests; "
        f"stack {stack.jobs_per_s:.2f} jobs/s, direct {direct.jobs_per_s:.2f} jobs/s, "
        f"ratio {stack.jobs_per_s / direct.jobs_per_s:.3f}",
        flush=True,
    )
    return level, stack, direct


def report(results) -> None:
    print()
    header = (
        f"{'in flight':>9} {'jobs':>5} {'stack j/s':>9} {'direct j/s':>10} {'ratio':>6} "
        f"{'stages/s':>8} {'cpu s/1k st':>11} {'peak pg':>7} {'sim cpu stack':>13} "
        f"{'sim cpu direct':>14} {'failed':>6}"
    )
    print(header)
    for level, stack, direct in results:
        ratio = stack.jobs_per_s / direct.jobs_per_s
        per_1k = 1000 * stack.control_cpu_s / max(1, stack.transitions)
        print(
            f"{level:>9} {stack.jobs:>5} {stack.jobs_per_s:>9.2f} {direct.jobs_per_s:>10.2f} "
            f"{ratio:>6.3f} {stack.transitions / stack.elapsed_s:>8.1f} {per_1k:>11.1f} "
            f"{stack.peak_connections:>7} "
            f"{_share(stack.sim_cpu_s, stack.elapsed_s):>13} "
            f"{_share(direct.sim_cpu_s, direct.elapsed_s):>14} {stack.failed:>6}"
        )
    print()
    for level, stack, _ in results:
        stops = ", ".join(f"stage {k}: {v}" for k, v in sorted(stack.stops.items(), key=str))
        lat = stack.latencies or [0.0]
        print(
            f"  {level} in flight: control plane {stack.control_cpu_s:.1f} CPU s over "
            f"{stack.elapsed_s:.1f} s ({stack.control_cpu_s / stack.elapsed_s:.2f} cores); "
            f"Tandem stopped at {stops}; job latency p50 {statistics.median(lat):.1f} s, "
            f"max {lat[-1]:.1f} s; {stack.started_again} jobs had a stage start again "
            f"(redelivery or reconciler); {stack.requests / max(1, stack.jobs):.2f} model "
            "requests per job"
        )
    for level, _, direct in results:
        print(
            f"  {level} in flight, direct: the asyncio client used {direct.control_cpu_s:.1f} "
            f"CPU s over {direct.elapsed_s:.1f} s"
        )
    by_level = {level: (stack, direct) for level, stack, direct in results}
    if 64 in by_level:
        stack, direct = by_level[64]
        ratio = stack.jobs_per_s / direct.jobs_per_s
        print(
            f"bar: ratio >= 0.90 at 64 in flight: {'met' if ratio >= 0.90 else 'NOT met'} ({ratio:.3f})"
        )
    per_1k = statistics.median(
        1000 * s.control_cpu_s / max(1, s.transitions) for _, s, _ in results
    )
    print(f"median control-plane CPU: {per_1k:.1f} s per 1,000 stage transitions")


def _share(cpu_s: float, wall_s: float) -> str:
    return f"{cpu_s:.1f}s ({100 * cpu_s / wall_s:.0f}%)"


def _api_key(url: str) -> str:
    from services.api.auth import create_key
    from services.storage.db import transaction

    with transaction(url) as session:
        return create_key(session, "capacity")


if __name__ == "__main__":
    main()
