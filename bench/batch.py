"""Batches at size: how fast the API ingests a JSONL upload, how much memory that takes,
and what batching the local engine across questions buys embedded.

Prints, for each upload size (default 10,000 and 100,000 lines):
- the ingest rate: lines / seconds from the start of the upload to the 202 (parsed,
  validated, COPYed into Postgres, duplicates checked); bars (issue 5): at least 5,000
  lines/s, and the two rates within 30% of each other (linear in the size);
- the API process's peak RSS while ingesting (gunicorn master + worker, sampled from
  /proc every 10 ms) and its growth over the RSS before the upload (memory flat);
- the feed rate: jobs put on Redis per second afterwards (the API's feeder pass, then the
  reconciler's), with the lanes' depth limit raised so that everything is fed.
And embedded (`tandem batch run`'s code): questions/min with one job at a time versus
TANDEM_LOCAL_MAX_BATCH jobs at once on one loaded, warmed local engine (slm_only,
--tokens generated tokens each); bar: 2x.

    .venv/bin/python bench/batch.py [--sizes 10000,100000] [--questions 32] [--tokens 128]
        [--threads 2] [--skip-ingest] [--skip-embedded]

Uses the machine's Postgres and Redis (or throwaway ones) with a scratch database and an
empty Redis database; no workers run, so the jobs stay queued and are dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import infra

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
    "babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the "
    "money she needs. How much more money does Betty need?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does "
    "he write a year?",
]
PAGE = os.sysconf("SC_PAGE_SIZE")


def write_upload(path: Path, lines: int) -> None:
    with path.open("w") as handle:
        for n in range(lines):
            question = f"{QUESTIONS[n % len(QUESTIONS)]} (variant {n})"
            handle.write(json.dumps({"custom_id": f"q{n:07d}", "question": question}) + "\n")


def tree(root: int) -> list[int]:
    """A process and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError):
            continue
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack += children.get(pid, [])
    return found


def tree_rss(root: int) -> int:
    """Resident bytes of a process and its descendants."""
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * PAGE
        except OSError:
            continue
    return total


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) a process and its descendants have used."""
    ticks = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


class RssSampler:
    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def upload(client: httpx.Client, path: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    with path.open("rb") as body:
        response = client.post(
            "/v1/batches?strategy=slm_only",
            content=body,
            headers={"Content-Type": "application/jsonl"},
        )
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return response.json(), elapsed


def wait_fed(client: httpx.Client, batch: dict, lines: int, timeout: float = 900) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        state = client.get(f"/v1/batches/{batch['id']}").json()
        if state["fed_through_line"] >= lines:
            return time.perf_counter() - started
        time.sleep(0.2)
    raise TimeoutError(f"batch {batch['id']} not fed after {timeout}s")


def ingest_bench(sizes: list[int]) -> list[tuple[int, float, int, int, float, float]]:
    rows = []
    with (
        infra.postgres_server() as admin,
        infra.scratch_database(admin) as db,
        infra.redis_server() as redis_url,
    ):
        from services.storage.db import upgrade

        upgrade(db)
        env = {
            "TANDEM_DATABASE_URL": db,
            "TANDEM_REDIS_URL": redis_url,
            "TANDEM_MAX_QUEUE_DEPTH": str(4 * max(sizes)),  # room to feed every job
            # No workers announce their capacity here; the feeder is to feed everything, so
            # that its rate, not a worker pool's, is what is measured.
            "TANDEM_FEED_MIN_DEPTH": str(4 * max(sizes)),
            "TANDEM_MAX_BODY_BYTES": str(256 * 1024 * 1024),
        }
        directory = Path(tempfile.mkdtemp(prefix="tandem-bench-batch-"))
        processes = infra.Processes(env, directory)
        try:
            port = infra.free_port()
            api = processes.api(port)
            # the API feeds for one pass after an upload; the reconciler's loop feeds the rest
            processes.start(
                "reconciler", [str(infra.BIN / "tandem"), "reconcile", "--interval", "5"]
            )
            client = httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {_api_key(db)}"},
                timeout=httpx.Timeout(60, read=900, write=900),
            )
            warm = directory / "warm.jsonl"
            write_upload(warm, 200)
            wait_fed(client, upload(client, warm)[0], 200)
            for size in sizes:
                path = directory / f"upload-{size}.jsonl"
                write_upload(path, size)
                before, cpu = tree_rss(api.pid), tree_cpu_s(api.pid)
                with RssSampler(api.pid) as sampler:
                    batch, elapsed = upload(client, path)
                cpu = tree_cpu_s(api.pid) - cpu
                assert batch["lines"]["valid"] == size, batch
                fed_s = wait_fed(client, batch, size)
                rows.append((size, elapsed, before, sampler.peak, fed_s, cpu))
                path.unlink()
        finally:
            processes.stop_all()
            _flush(redis_url)
    return rows


def _flush(redis_url: str) -> None:
    import redis

    redis.Redis.from_url(redis_url).flushdb()


def _api_key(url: str) -> str:
    from services.api.auth import create_key
    from services.storage.db import transaction

    with transaction(url) as session:
        return create_key(session, "bench")


def embedded_bench(questions: int, tokens: int) -> tuple[float, float, int]:
    from services.batch_cli import run_file
    from services.core.engines import Engines
    from services.settings import get_settings

    directory = Path(tempfile.mkdtemp(prefix="tandem-bench-run-"))
    source, warm = directory / "in.jsonl", directory / "warm-in.jsonl"
    write_upload(source, questions)
    write_upload(warm, 1)
    params = json.dumps({"executor_max_tokens": tokens})
    settings = get_settings()
    batch = settings.local_max_batch
    # One engine for both runs, loaded and warmed first: throughput is a rate of the
    # running engine (a worker or a long `tandem batch run`), not of its start-up.
    engines = Engines(settings)
    try:
        run_file(warm, directory / "warm.jsonl", "slm_only", params, 1, False, engines)
        timings = []
        for concurrency in (1, batch):
            out = directory / f"out-{concurrency}.jsonl"
            started = time.perf_counter()
            counts = run_file(source, out, "slm_only", params, concurrency, False, engines)
            timings.append(time.perf_counter() - started)
            assert counts["succeeded"] == questions, counts
    finally:
        engines.close()
    return timings[0], timings[1], batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128, help="executor_max_tokens (embedded)")
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument(
        "--threads",
        default=os.environ.get("TANDEM_LOCAL_THREADS", "0"),
        help="llama.cpp threads for the embedded part (TANDEM_LOCAL_THREADS; default 0: one "
        "per core, the engine's default; on a busy machine spinning threads collide, use 1)",
    )
    args = parser.parse_args()
    os.environ["TANDEM_LOCAL_THREADS"] = args.threads
    sizes = [int(size) for size in args.sizes.split(",")]

    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (before)")
    if not args.skip_ingest:
        report_ingest(ingest_bench(sizes))
    if not args.skip_embedded:
        report_embedded(args.questions, args.tokens, args.threads)


def report_ingest(rows: list[tuple[int, float, int, int, float, float]]) -> None:
    mib = 1024 * 1024
    rates = []
    for size, elapsed, before, peak, fed_s, cpu in rows:
        rate = size / elapsed
        rates.append(rate)
        print(
            f"ingest {size:>7} lines: {elapsed:6.2f} s  {rate:6.0f} lines/s "
            f"(API used {cpu:5.2f} CPU-s: {size / max(cpu, 1e-3):6.0f} lines per API CPU-s)  "
            f"API RSS {before / mib:5.1f} MiB before, peak {peak / mib:5.1f} MiB "
            f"(+{(peak - before) / mib:4.1f})  fed to Redis in {fed_s:6.2f} s "
            f"({size / fed_s:5.0f} jobs/s)"
        )
    slowest = min(rates)
    spread = (max(rates) - slowest) / max(rates)
    print(
        f"bar: ingest >= 5,000 lines/s: {'met' if slowest >= 5000 else 'NOT met'} "
        f"(slowest {slowest:.0f})"
    )
    print(
        f"bar: linear (rates within 30%): {'met' if spread <= 0.30 else 'NOT met'} "
        f"(spread {spread:.0%}); load average now {os.getloadavg()[0]:.1f}"
    )


def report_embedded(questions: int, tokens: int, threads: str) -> None:
    single_s, batched_s, batch = embedded_bench(questions, tokens)
    single = questions / single_s * 60
    batched = questions / batched_s * 60
    shown = threads if threads != "0" else f"{os.cpu_count()} (one per core)"
    print(f"embedded, {questions} questions, slm_only, {tokens} tokens, {shown} llama.cpp threads:")
    print(f"  one at a time       {single_s:7.2f} s  {single:7.1f} questions/min")
    print(f"  {batch} at once (batched) {batched_s:7.2f} s  {batched:7.1f} questions/min")
    ratio = batched / single
    print(f"bar: batched >= 2x one-at-a-time: {'met' if ratio >= 2 else 'NOT met'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
