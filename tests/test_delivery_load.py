"""200 SCoT jobs whose drafts finish together, through the API and real Celery workers with
no reconciler running: a stage hand-off that loses its next step would leave its job
stalled forever, so every job finishing is the proof that none was lost (issue 21). The
workers' `tandem_stage_wasted_total` says no stage ran that was not recorded."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests import infra

pytestmark = [pytest.mark.slow, pytest.mark.model]

JOBS = 200
# Two-token drafts of one job end in the same batched decoding step; the selection reads one
# token; the finish is short.
SCOT = {"drafts": 5, "draft_max_tokens": 2, "llm_max_tokens": 4}


def wasted(metrics_port: int) -> float:
    return infra.metric_total(metrics_port, "tandem_stage_wasted_total")


@pytest.mark.timeout(1500)
def test_scot_jobs_whose_drafts_finish_together_all_finish(service_env, api_key, tmp_path: Path):
    infra.end_unfinished_work(service_env["TANDEM_DATABASE_URL"], service_env["TANDEM_REDIS_URL"])
    ports = {"executor": infra.free_port(), "coordinator": infra.free_port()}
    processes = infra.Processes({**service_env, "TANDEM_LOCAL_MAX_BATCH": "16"}, tmp_path)
    api_port = infra.free_port()
    try:
        for role, concurrency in (("executor", 16), ("coordinator", 8)):
            processes.env["TANDEM_METRICS_PORT"] = str(ports[role])
            processes.worker(role, concurrency=concurrency)
        processes.env["TANDEM_METRICS_PORT"] = "0"
        processes.api(api_port)
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{api_port}",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=60,
        )
        ids = []
        for n in range(JOBS):
            body = {"question": f"What is {n} + {n + 1}?", "strategy": "scot", "params": SCOT}
            response = http.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        started = time.monotonic()
        deadline = started + 1200
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending)[:50]:
                job = http.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    assert job["status"] == "succeeded", job["error"]
                    assert [s["seq"] for s in job["stages"]] == list(range(len(job["stages"])))
                    pending.discard(job_id)
            time.sleep(0.5)
        assert not pending, f"{len(pending)} of {JOBS} jobs stalled (no reconciler ran)"
        assert wasted(ports["executor"]) + wasted(ports["coordinator"]) == 0
        print(f"\n{JOBS} SCoT jobs in {time.monotonic() - started:.0f} s, none stalled, 0 wasted")
    finally:
        processes.stop_all()
