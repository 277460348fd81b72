"""Sustained submit-and-poll load on the REST API, from a process of its own.

Client threads each keep a few jobs in flight: submit while under `--in-flight`, and poll
their oldest unfinished job, in a loop, for `--duration` seconds. Then the load stops, the
jobs drain for up to `--drain` seconds, and it prints:

- requests/s, and latency p50 / p95 / p99 for submit (POST /v1/jobs) and poll (GET);
- errors by HTTP status (429 = a limit; 503 = database or broker down);
- jobs submitted, completed, failed, lost (= accepted - finished after the drain), and
  duplicated stages (rows beyond one per (job, seq), counted in Postgres).

The jobs are cheap on purpose (`slm_only`, one executor stage of `--max-tokens` 1 token by
default), so the numbers measure the service (API, Postgres, Redis, queue hops), not the
model.

    .venv/bin/python bench/load.py [--duration 60] [--clients 8] [--in-flight 4]
    .venv/bin/python bench/load.py --api http://127.0.0.1:8000 --key KEY \\
        [--database-url postgresql+psycopg://...]   # against running services

Without `--api` it starts its own stack like the tests do (tests/infra.py): a scratch
database on the machine's Postgres (or a throwaway one), a throwaway Redis, the API, one
executor worker and the reconciler, all on loopback, and removes it all afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import infra  # the same process helpers the tests use

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Tally:
    """What the client threads saw (appended under the GIL; read after they stop)."""

    submit_s: list[float] = field(default_factory=list)
    poll_s: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    accepted: list[str] = field(default_factory=list)
    finished_seen: set[str] = field(default_factory=set)


def client_loop(
    base_url: str, key: str, body: dict, in_flight: int, stop: threading.Event, tally: Tally
) -> None:
    outstanding: list[str] = []
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        while not stop.is_set():
            if len(outstanding) < in_flight:
                status = timed(client, "POST", "/v1/jobs", body, tally.submit_s, tally)
                if status[0] == 202:
                    outstanding.append(status[1]["id"])
                    tally.accepted.append(status[1]["id"])
                elif status[0] in (429, 503):
                    time.sleep(0.2)  # back off as a polite client would
            if outstanding:
                job_id = outstanding.pop(0)
                status = timed(client, "GET", f"/v1/jobs/{job_id}", None, tally.poll_s, tally)
                if status[0] == 200 and status[1]["status"] in FINAL:
                    tally.finished_seen.add(job_id)
                else:
                    outstanding.append(job_id)


def timed(client: httpx.Client, method: str, path: str, body, into: list, tally: Tally):
    started = time.perf_counter()
    try:
        response = client.request(method, path, json=body)
    except httpx.HTTPError as error:
        into.append(time.perf_counter() - started)
        tally.errors[f"{method} {type(error).__name__}"] += 1
        return 0, None
    into.append(time.perf_counter() - started)
    tally.statuses[f"{method} {response.status_code}"] += 1
    if response.status_code >= 400:
        tally.errors[f"{method} {response.status_code}"] += 1
        return response.status_code, None
    return response.status_code, response.json()


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return f"p50 {at(0.50):.1f} ms  p95 {at(0.95):.1f} ms  p99 {at(0.99):.1f} ms"


def job_counts(database_url: str | None, ids: list[str]) -> dict[str, int] | None:
    """Statuses and duplicated stages of the given jobs, from Postgres."""
    if not database_url or not ids:
        return None
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            counts = dict(
                connection.execute(
                    text("SELECT status, count(*) FROM jobs WHERE id = ANY(:ids) GROUP BY status"),
                    {"ids": ids},
                ).all()
            )
            total, distinct = connection.execute(
                text(
                    "SELECT count(*), count(DISTINCT (job_id, seq)) FROM stages"
                    " WHERE job_id = ANY(:ids)"
                ),
                {"ids": ids},
            ).one()
    finally:
        engine.dispose()
    counts["stages"] = total
    counts["duplicated_stages"] = total - distinct
    return counts


def drain(
    base_url: str, key: str, database_url: str | None, ids: list[str], timeout: float
) -> dict[str, int]:
    """Wait for every accepted job to finish (or the timeout); the final statuses."""
    deadline = time.monotonic() + timeout
    while True:
        counts = job_counts(database_url, ids)
        if counts is None:  # no database URL: ask the API, job by job
            counts = Counter()
            with httpx.Client(
                base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
            ) as client:
                for job_id in ids:
                    counts[client.get(f"/v1/jobs/{job_id}").json()["status"]] += 1
        unfinished = counts.get("queued", 0) + counts.get("running", 0)
        if not unfinished or time.monotonic() > deadline:
            return dict(counts)
        time.sleep(1)


def run_load(
    args, base_url: str, key: str, database_url: str | None, metrics_port: int | None = None
) -> None:
    body = {
        "question": QUESTION,
        "strategy": "slm_only",
        "params": {"executor_max_tokens": args.max_tokens},
    }
    tally = Tally()
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=client_loop,
            args=(base_url, key, body, args.in_flight, stop, tally),
            daemon=True,
        )
        for _ in range(args.clients)
    ]
    print(
        f"load: {args.clients} clients x {args.in_flight} jobs in flight, {args.duration:.0f} s, "
        f"slm_only with executor_max_tokens={args.max_tokens}; load average before: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(args.duration)
    stop.set()
    for thread in threads:
        thread.join(60)
    elapsed = time.perf_counter() - started
    requests = len(tally.submit_s) + len(tally.poll_s)
    finished_during = len(tally.finished_seen)

    print(f"\nrequests: {requests} in {elapsed:.1f} s = {requests / elapsed:.1f} req/s")
    print(
        f"  submit: {len(tally.submit_s)} ({len(tally.submit_s) / elapsed:.1f}/s)  "
        f"{percentiles(tally.submit_s)}"
    )
    print(
        f"  poll:   {len(tally.poll_s)} ({len(tally.poll_s) / elapsed:.1f}/s)  "
        f"{percentiles(tally.poll_s)}"
    )
    print(f"  statuses: {dict(sorted(tally.statuses.items()))}")
    print(f"  errors by status: {dict(sorted(tally.errors.items())) or 'none'}")
    print(
        f"  jobs seen finished during the load: {finished_during} "
        f"({finished_during / elapsed:.1f} jobs/s)"
    )

    print(f"\ndraining (up to {args.drain:.0f} s) ...", flush=True)
    drain_started = time.perf_counter()
    counts = drain(base_url, key, database_url, tally.accepted, args.drain)
    finished = sum(counts.get(status, 0) for status in FINAL)
    submitted = len(tally.accepted)
    print(f"drained in {time.perf_counter() - drain_started:.1f} s")
    print(f"\njobs submitted (202): {submitted}")
    print(f"jobs completed (succeeded): {counts.get('succeeded', 0)}")
    print(f"jobs failed: {counts.get('failed', 0)}  cancelled: {counts.get('cancelled', 0)}")
    print(f"jobs lost (submitted - finished): {submitted - finished}")
    if "duplicated_stages" in counts:
        print(f"stages: {counts['stages']}  duplicated stages: {counts['duplicated_stages']}")
    else:
        print("duplicated stages: not counted (pass --database-url)")
    if metrics_port:
        wasted = infra.metric_total(metrics_port, "tandem_stage_wasted_total")
        print(f"wasted stage executions (ran, not recorded): {wasted:.0f}")


def own_stack(stack: ExitStack, args) -> tuple[str, str, str, int]:
    """API, executor worker(s) and reconciler on a scratch database and a throwaway Redis."""
    from services.api.auth import create_key
    from services.storage.db import transaction, upgrade

    admin = stack.enter_context(infra.postgres_server())
    database_url = stack.enter_context(infra.scratch_database(admin))
    upgrade(database_url)
    redis_url, _ = stack.enter_context(infra.throwaway_redis())
    with transaction(database_url) as session:
        key = create_key(session, "load")
    log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tandem-load-")))
    processes = infra.Processes(
        {
            "TANDEM_DATABASE_URL": database_url,
            "TANDEM_REDIS_URL": f"{redis_url}/0",
            "TANDEM_RATE_LIMIT_PER_MINUTE": "0",  # one key makes all the load
            "TANDEM_LOCAL_MAX_BATCH": str(args.worker_concurrency),
            "TANDEM_LOCAL_THREADS": "1",
            "TANDEM_LOG_LEVEL": "WARNING",
        },
        log_dir,
    )
    stack.callback(processes.stop_all)
    metrics_port = infra.free_port()
    processes.env["TANDEM_METRICS_PORT"] = str(metrics_port)
    processes.worker("executor", concurrency=args.worker_concurrency)
    processes.env["TANDEM_METRICS_PORT"] = "0"
    processes.start("reconciler", [str(infra.BIN / "tandem"), "reconcile", "--interval", "5"])
    port = infra.free_port()
    processes.start(
        "api",
        [
            str(infra.BIN / "tandem"),
            "api",
            "--port",
            str(port),
            "--workers",
            str(args.api_workers),
            "--threads",
            "16",
        ],
    )
    base_url = f"http://127.0.0.1:{port}"
    infra.wait_for(
        lambda: httpx.get(f"{base_url}/readyz").status_code == 200, 60, "the API", interval=0.2
    )
    print(
        f"own stack: API {base_url} ({args.api_workers} processes x 16 threads), "
        f"1 executor worker ({args.worker_concurrency} threads), reconciler",
        flush=True,
    )
    return base_url, key, database_url, metrics_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=8, help="client threads")
    parser.add_argument("--in-flight", type=int, default=4, help="unfinished jobs per client")
    parser.add_argument("--max-tokens", type=int, default=1, help="executor_max_tokens per job")
    parser.add_argument("--drain", type=float, default=180.0, help="seconds to wait after")
    parser.add_argument("--api", help="base URL of running services (loopback)")
    parser.add_argument("--key", help="API key for --api")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TANDEM_DATABASE_URL"),
        help="the services' database, to count duplicated stages (with --api)",
    )
    parser.add_argument("--api-workers", type=int, default=2, help="own stack: API processes")
    parser.add_argument("--worker-concurrency", type=int, default=8, help="own stack")
    args = parser.parse_args()
    if args.api:
        host = httpx.URL(args.api).host
        if host not in ("127.0.0.1", "localhost", "::1"):
            parser.error("--api must be a loopback address (this is a load generator)")
        if not args.key:
            parser.error("--api needs --key")
        run_load(args, args.api.rstrip("/"), args.key, args.database_url)
        return
    with ExitStack() as stack:
        base_url, key, database_url, metrics_port = own_stack(stack, args)
        run_load(args, base_url, key, database_url, metrics_port)


if __name__ == "__main__":
    main()
