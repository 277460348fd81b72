"""The API's /metrics under gunicorn's several processes: `tandem api --workers 2` counts
requests served by either process in every scrape (prometheus_client multiprocess mode),
keeps a killed process's counts, and removes its metrics directory at exit; the
scrape-time jobs gauge runs its Postgres query at most once per cache period."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests import infra

pytestmark = pytest.mark.timeout(180)

REQUESTS = 120


def _healthz_count(body: str) -> float:
    """tandem_http_request_seconds_count for GET /healthz 200, summed over the scrape."""
    pattern = re.compile(
        r'^tandem_http_request_seconds_count\{(?=[^}]*endpoint="/healthz")'
        r'(?=[^}]*method="GET")(?=[^}]*status="200")[^}]*\} ([0-9.e+]+)$',
        re.M,
    )
    return sum(float(v) for v in pattern.findall(body))


def _worker_pids(master: int) -> set[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True
    ).stdout
    return {int(p) for p in out.split()}


def test_two_processes_are_counted_together(service_env: dict[str, str], tmp_path: Path) -> None:
    port = infra.free_port()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**service_env, "TMPDIR": str(scratch)}  # where the metrics directory goes
    processes = infra.Processes(env, tmp_path)
    api = processes.start(
        "api",
        [str(infra.BIN / "tandem"), "api", "--port", str(port), "--workers", "2", "--threads", "4"],
    )
    base = f"http://127.0.0.1:{port}"
    try:
        infra.wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, 60, "the API")
        infra.wait_for(lambda: len(_worker_pids(api.pid)) == 2, 30, "two API processes")
        before = _healthz_count(httpx.get(f"{base}/metrics").text)

        def hit(_: int) -> int:  # a new connection each time, so both processes serve
            return httpx.get(f"{base}/healthz", headers={"Connection": "close"}).status_code

        with ThreadPoolExecutor(16) as pool:
            assert set(pool.map(hit, range(REQUESTS))) == {200}

        [metrics_dir] = list(scratch.glob("tandem-metrics-*"))
        writers = {
            int(m.group(1))
            for f in metrics_dir.iterdir()
            if (m := re.search(r"_(\d+)\.db$", f.name))
        }
        assert writers == _worker_pids(api.pid), "both processes wrote their counts"
        for _ in range(4):  # every scrape, whichever process answers, sees every request
            assert _healthz_count(httpx.get(f"{base}/metrics").text) == before + REQUESTS

        victim = min(_worker_pids(api.pid))
        os.kill(victim, signal.SIGKILL)
        infra.wait_for(
            lambda: victim not in _worker_pids(api.pid) and len(_worker_pids(api.pid)) == 2,
            30,
            "gunicorn to replace the killed process",
        )
        infra.wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, 30, "the API")
        after = _healthz_count(httpx.get(f"{base}/metrics").text)
        assert after >= before + REQUESTS + 1  # the dead process's requests still count
    finally:
        processes.stop_all()
    assert not metrics_dir.exists(), "the metrics directory is removed at exit"


def test_jobs_gauge_queries_postgres_once_per_cache_period(in_process_settings) -> None:
    from services.api import create_app

    app = create_app(in_process_settings, enqueue=lambda tasks: None)
    collector = app.extensions["tandem.metrics.state"]
    client = app.test_client()
    for _ in range(5):
        body = client.get("/metrics").get_data(as_text=True)
        assert "# TYPE tandem_jobs gauge" in body
    assert collector.queries == 1
    collector.cache_s = 0.0  # an expired cache asks again
    client.get("/metrics")
    assert collector.queries == 2
