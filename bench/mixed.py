"""Mixed workloads: one owner's backlog batch, another owner's small batch, and a third
owner's interactive jobs on the same deployment, in one run (issue 16).

Owner A uploads a backlog batch (default 5,000 cheap lines), owner B a 100-line batch just
after, and owner C submits single jobs at a steady rate meanwhile (default 40, one every
0.5 s, each generating 32 tokens: an answer, not a ping; a 1-token job with a cached prompt
takes 10 ms and measures only queue hops). Each of the three is
also measured alone, on the same stack, first. Prints:
- C's job latency p50 / p99 (server side: created -> finished) mixed, against C's idle p50
  (bar: ratio at most 1.5);
- B's completion time mixed against B alone, and whether B finished before A (bar);
- A's throughput (lines/s) mixed against A alone (bar: at least 0.9), beside the work B and
  C add on the same engine (each timed alone): with that work W, A keeps about
  A / (A + W) of its throughput (a little more, since C's model calls overlap A's queue
  hops), so the bar needs B and C to add under about 10% of A's work.

    .venv/bin/python bench/mixed.py [--a-lines 5000] [--b-lines 100] [--c-jobs 40]
        [--c-interval 0.5] [--c-max-tokens 32] [--engine local|sim] [--concurrency N]

The stack: the API, one executor worker (the jobs are `slm_only`, one cheap stage each) and
the reconciler (which runs the batch feeder), on a scratch database and a throwaway Redis,
all on loopback. The executor's engine (`--engine`):
- `local` (default): the in-process llama.cpp engine on the default model, one thread, 8
  worker threads. On CPU a step's cost grows with every token in it, so B's and C's work
  displaces A's one for one;
- `sim`: a SIMULATED SGLang server (`bench/sim_server.py`, profile 7b-h100, a stand-in
  that takes a GPU engine's time and says nothing about a model) with SGLang's
  `--enable-priority-scheduling`, 64 worker threads. On a GPU a decode step costs nearly
  the same for 1 sequence or 64, so B's and C's work mostly rides along with A's: this is
  the bench on the economics of the deployment users run, measuring the control plane.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import simulated
from tests import infra

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
CHEAP = {"executor_max_tokens": 1}  # a backlog line: one token, its prompt cached
FINAL = ("succeeded", "failed", "cancelled")


class Owner:
    def __init__(self, base_url: str, key: str) -> None:
        self.http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        )

    def upload(self, lines: int, tag: str) -> str:
        body = "".join(
            json.dumps({"custom_id": f"{tag}{i}", "question": QUESTION}) + "\n"
            for i in range(lines)
        )
        response = self.http.post(
            "/v1/batches",
            params={"strategy": "slm_only", "params": json.dumps(CHEAP)},
            content=body,
            headers={"Content-Type": "application/jsonl"},
        )
        response.raise_for_status()
        return response.json()["id"]

    def batch_done(self, batch_id: str) -> bool:
        counts = self.http.get(f"/v1/batches/{batch_id}").json()["request_counts"] or {}
        return counts.get("pending", 1) == 0

    def wait_batch(self, batch_id: str, started: float, timeout: float = 3600) -> float:
        """Seconds from `started` until the batch has no pending line."""
        deadline = started + timeout
        while not self.batch_done(batch_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} not done after {timeout:.0f} s")
            time.sleep(0.25)
        return time.monotonic() - started

    def submit(self, max_tokens: int) -> str:
        params = {"executor_max_tokens": max_tokens}
        body = {"question": QUESTION, "strategy": "slm_only", "params": params}
        response = self.http.post("/v1/jobs", json=body)
        response.raise_for_status()
        return response.json()["id"]

    def latency(self, job_id: str, timeout: float = 900) -> Latency:
        deadline = time.monotonic() + timeout
        while True:
            job = self.http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in FINAL:
                timings = job["timings"]
                model = sum(stage["latency_s"] for stage in job["stages"])
                return Latency(float(timings["total_s"]), float(timings["queued_s"] or 0), model)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not done")
            time.sleep(0.1)


@dataclass(frozen=True, order=True)
class Latency:
    """A job's time, server side: created -> finished, of it created -> started (waiting for
    a worker), and the model call."""

    total_s: float
    queued_s: float
    model_s: float


def interactive(owner: Owner, jobs: int, interval: float, max_tokens: int) -> list[Latency]:
    """Submit `jobs` single jobs, one every `interval` seconds; their latencies."""
    ids = []
    for _ in range(jobs):
        ids.append(owner.submit(max_tokens))
        time.sleep(interval)
    return sorted(owner.latency(job_id) for job_id in ids)


def describe(latencies: list[Latency]) -> str:
    p50 = statistics.median
    return (
        f"p50 {p50(t.total_s for t in latencies):.2f} s (waiting for a worker "
        f"{p50(t.queued_s for t in latencies):.2f} s, model call "
        f"{p50(t.model_s for t in latencies):.2f} s)"
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def stack(exits: ExitStack, engine: str, concurrency: int) -> tuple[str, dict[str, str]]:
    from services.api.auth import create_key
    from services.storage.db import transaction, upgrade

    admin = exits.enter_context(infra.postgres_server())
    database_url = exits.enter_context(infra.scratch_database(admin))
    upgrade(database_url)
    redis_url, _ = exits.enter_context(infra.throwaway_redis())
    with transaction(database_url) as session:
        keys = {owner: create_key(session, f"mixed-{owner}") for owner in "ABC"}
    log_dir = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="tandem-mixed-")))
    processes = infra.Processes(
        {
            "TANDEM_DATABASE_URL": database_url,
            "TANDEM_REDIS_URL": f"{redis_url}/0",
            "TANDEM_RATE_LIMIT_PER_MINUTE": "0",
            "TANDEM_LOCAL_MAX_BATCH": str(concurrency),
            "TANDEM_LOCAL_THREADS": "1",
            "TANDEM_LOG_LEVEL": "WARNING",
        },
        log_dir,
    )
    exits.callback(processes.stop_all)
    if engine == "sim":
        simulated.serve(
            processes, "executor", simulated.EXECUTOR_7B, log_dir / "hub",
            "--enable-priority-scheduling",
        )  # fmt: skip
    processes.worker("executor", concurrency=concurrency)
    processes.start("reconciler", [str(infra.BIN / "tandem"), "reconcile", "--interval", "5"])
    port = infra.free_port()
    processes.api(port)
    return f"http://127.0.0.1:{port}", keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a-lines", type=int, default=5000)
    parser.add_argument("--b-lines", type=int, default=100)
    parser.add_argument("--c-jobs", type=int, default=40)
    parser.add_argument("--c-interval", type=float, default=0.5, help="seconds between C's jobs")
    parser.add_argument(
        "--c-max-tokens", type=int, default=32, help="tokens each of C's jobs generates"
    )
    parser.add_argument("--engine", choices=("local", "sim"), default="local")
    parser.add_argument(
        "--concurrency", type=int, help="executor worker threads (default: local 8, sim 64)"
    )
    args = parser.parse_args()
    concurrency = args.concurrency or {"local": 8, "sim": 64}[args.engine]
    with ExitStack() as exits:
        base_url, keys = stack(exits, args.engine, concurrency)
        a, b, c = (Owner(base_url, keys[owner]) for owner in "ABC")
        c.latency(c.submit(args.c_max_tokens))  # warm: the worker loads its model

        idle = interactive(c, args.c_jobs, args.c_interval, args.c_max_tokens)
        print(f"C alone: {args.c_jobs} jobs, latency {describe(idle)}", flush=True)
        started = time.monotonic()
        b_alone = b.wait_batch(b.upload(args.b_lines, "b-alone"), started)
        print(f"B alone: {args.b_lines} lines in {b_alone:.1f} s", flush=True)
        started = time.monotonic()
        a_alone = a.wait_batch(a.upload(args.a_lines, "a-alone"), started)
        print(f"A alone: {args.a_lines} lines in {a_alone:.1f} s", flush=True)

        started = time.monotonic()
        a_batch = a.upload(args.a_lines, "a-mixed")
        b_batch = b.upload(args.b_lines, "b-mixed")
        b_time: dict[str, float] = {}
        waiter = threading.Thread(
            target=lambda: b_time.setdefault("s", b.wait_batch(b_batch, started))
        )
        waiter.start()
        mixed = interactive(c, args.c_jobs, args.c_interval, args.c_max_tokens)
        a_mixed = a.wait_batch(a_batch, started)
        waiter.join()

    idle_p50 = statistics.median(t.total_s for t in idle)
    mixed_p50 = statistics.median(t.total_s for t in mixed)
    ratio = mixed_p50 / idle_p50
    a_rate_alone, a_rate_mixed = args.a_lines / a_alone, args.a_lines / a_mixed
    b_first = b_time["s"] < a_mixed
    share = a_rate_mixed / a_rate_alone
    print(
        f"\nmixed run ({args.engine} engine, {concurrency} worker threads): A {args.a_lines} "
        f"lines, B {args.b_lines} lines, C {args.c_jobs} jobs"
    )
    print(
        f"C latency {describe(mixed)}, p99 {percentile([t.total_s for t in mixed], 0.99):.2f} s;"
        f" idle p50 {idle_p50:.2f} s; ratio {ratio:.2f}   bar <= 1.5: {'met' if ratio <= 1.5 else 'NOT met'}"
    )
    print(
        f"B done in {b_time['s']:.1f} s (alone {b_alone:.1f} s); A done in {a_mixed:.1f} s; "
        f"B before A: {'met' if b_first else 'NOT met'}"
    )
    if args.engine == "local":  # a CPU step's cost grows with each token: work displaces
        c_work = sum(t.model_s for t in idle)
        added = b_alone + c_work  # B's and C's work, each timed alone
        print(
            f"work beside A: B {b_alone:.1f} s + C {c_work:.1f} s of model "
            f"calls = {added / a_alone:.0%} of A alone ({a_alone:.1f} s): A's throughput "
            f"ratio at equal efficiency {a_alone / (a_alone + added):.2f}"
        )
    print(
        f"A throughput {a_rate_mixed:.1f} lines/s (alone {a_rate_alone:.1f}); ratio {share:.2f}"
        f"   bar >= 0.9: {'met' if share >= 0.9 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
