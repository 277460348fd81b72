"""What the services cost on top of the model: the same Tandem jobs run embedded and
through the API, Redis, Celery workers and Postgres, in one run.

Prints the wall-time ratio (services / embedded) and the queue hop latency between
stages (p50, p99): from a stage's model call returning (or the job's creation) to the
next stage's model call starting on its worker. Bars (issue 3): ratio <= 1.10, hop p50 < 10 ms.

    .venv/bin/python bench/overhead.py [--jobs 6]

Uses the machine's Postgres and Redis (or throwaway ones), a scratch database, and one
worker process per queue with the default model; all traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import infra

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. How much more money does Betty need?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
]
# How often the client polls a job. Not part of any hop (hops are timed from the stage
# records), but a tighter loop would take CPU from the workers on a 2-core machine.
POLL_S = 0.02
PARAMS = {"budgets": [0, 32, 64], "executor_max_tokens": 48, "cost_preference": "quality"}


def run_embedded(questions: list[str]) -> float:
    from services.core.engines import Engines
    from services.core.requests import parse_job_request
    from services.core.runner import run_job
    from services.settings import Settings

    engines = Engines(Settings())
    run_job(parse_job_request({"question": "1+1?", "params": PARAMS}, 8000), engines)  # warm
    started = time.perf_counter()
    for question in questions:
        run_job(parse_job_request({"question": question, "params": PARAMS}, 8000), engines)
    elapsed = time.perf_counter() - started
    engines.close()
    return elapsed


def run_services(client: httpx.Client, questions: list[str]) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    jobs = []
    for question in questions:  # one at a time, like the embedded loop
        job_id = client.post("/v1/jobs", json={"question": question, "params": PARAMS}).json()["id"]
        while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            time.sleep(POLL_S)
        jobs.append(job)
    return time.perf_counter() - started, jobs


def hops_ms(job: dict) -> list[float]:
    """Gaps between one stage's commit and the next stage's start (the first: since submit)."""
    previous = datetime.fromisoformat(job["created_at"])
    gaps = []
    for stage in job["stages"]:
        committed = datetime.fromisoformat(stage["created_at"])
        started = committed.timestamp() - stage["latency_s"]
        gaps.append((started - previous.timestamp()) * 1000)
        previous = committed
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6)
    args = parser.parse_args()
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.jobs)]

    embedded_s = run_embedded(questions)
    with (
        infra.postgres_server() as admin,
        infra.scratch_database(admin) as db,
        infra.redis_server() as redis_url,
    ):
        from services.storage.db import upgrade

        upgrade(db)
        env = {"TANDEM_DATABASE_URL": db, "TANDEM_REDIS_URL": redis_url}
        processes = infra.Processes(env, Path(tempfile.mkdtemp(prefix="tandem-bench-")))
        metrics_ports = []
        try:
            for queue in ("coordinator", "classifier", "executor"):
                metrics_ports.append(infra.free_port())
                processes.env["TANDEM_METRICS_PORT"] = str(metrics_ports[-1])
                processes.worker(queue, concurrency=2)
            processes.env["TANDEM_METRICS_PORT"] = "0"
            port = infra.free_port()
            processes.api(port)
            key = _api_key(db)
            client = httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
            run_services(client, questions[:1])  # warm: every worker loads its model
            services_s, jobs = run_services(client, questions)
            wasted = sum(
                infra.metric_total(port, "tandem_stage_wasted_total") for port in metrics_ports
            )
        finally:
            processes.stop_all()

    failed = [job["id"] for job in jobs if job["status"] != "succeeded"]
    gaps = sorted(gap for job in jobs for gap in hops_ms(job))
    p50, p99 = statistics.median(gaps), percentile(gaps, 0.99)
    firsts = sorted(hops_ms(job)[0] for job in jobs)  # submit -> first stage (a claim)
    between = sorted(gap for job in jobs for gap in hops_ms(job)[1:])  # handed off
    ratio = services_s / embedded_s
    print(
        f"jobs: {len(questions)} tandem jobs, budgets {PARAMS['budgets']}, "
        f"{sum(len(j['stages']) for j in jobs)} stages through the queues"
        + (f", FAILED: {failed}" if failed else "")
    )
    print(f"{'embedded wall time':<28}{embedded_s:>9.2f} s")
    print(f"{'services wall time':<28}{services_s:>9.2f} s")
    print(
        f"{'ratio services/embedded':<28}{ratio:>9.3f}   bar <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'}"
    )
    print(f"{'queue hop p50':<28}{p50:>9.2f} ms  bar < 10 ms: {'met' if p50 < 10 else 'NOT met'}")
    print(f"{'queue hop p99':<28}{p99:>9.2f} ms  ({len(gaps)} hops)")
    print(f"{'wasted stage executions':<28}{wasted:>9.0f}     (ran but not recorded)")
    print(
        f"{'  stage to stage p50, p99':<28}{statistics.median(between):>9.2f} ms, "
        f"{percentile(between, 0.99):.2f} ms ({len(between)} hops)"
    )
    print(
        f"{'  submit to first stage p50':<28}{statistics.median(firsts):>9.2f} ms "
        f"({len(firsts)} hops)"
    )
    by_kind: dict[str, list[float]] = {}
    for job in jobs:
        for stage, gap in list(zip(job["stages"], hops_ms(job), strict=True))[1:]:
            by_kind.setdefault(stage["kind"], []).append(gap)
    for kind, kind_gaps in sorted(by_kind.items()):
        print(
            f"{'  into ' + kind + ' p50':<28}{statistics.median(kind_gaps):>9.2f} ms ({len(kind_gaps)} hops)"
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _api_key(url: str) -> str:
    from services.api.auth import create_key
    from services.storage.db import transaction

    with transaction(url) as session:
        return create_key(session, "bench")


if __name__ == "__main__":
    main()
