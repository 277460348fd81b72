"""End to end through the services: the API and real Celery worker processes (one per
queue) against real Postgres and Redis, with the real default model."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import infra

pytestmark = [pytest.mark.slow, pytest.mark.model]

QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?"
)
# Small budgets keep a job to a few seconds on two CPU cores; the stages are the real ones.
PARAMS = {"budgets": [0, 12, 24], "executor_max_tokens": 24, "cost_preference": "quality"}
SAME_IN_BOTH = ("seq", "kind", "role", "model", "prompt_tokens", "generated_tokens", "tflops")


class Stack:
    def __init__(self, processes: infra.Processes, base_url: str, key: str) -> None:
        self.processes = processes
        self.http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def submit(
        self, question: str = QUESTION, strategy: str = "tandem", params=None, **headers
    ) -> dict:
        body = {"question": question, "strategy": strategy, "params": params or PARAMS}
        response = self.http.post("/v1/jobs", json=body, headers=headers)
        assert response.status_code in (200, 202), response.text
        return response.json()

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, timeout: float = 240, until=None) -> dict:
        until = until or (lambda job: job["status"] in ("succeeded", "failed", "cancelled"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.2)
        logs = {name: self.processes.log(name)[-1500:] for name in self.processes.running}
        raise AssertionError(f"job {job_id} stuck: {self.job(job_id)['status']}; logs: {logs}")


@pytest.fixture(scope="module")
def stack(service_env, api_key, tmp_path_factory) -> Iterator[Stack]:
    log_dir = Path(tmp_path_factory.mktemp("logs"))
    processes = infra.Processes(service_env, log_dir)
    port = infra.free_port()
    try:
        for queue in ("coordinator", "classifier", "executor"):
            processes.worker(queue)
        processes.start(
            "reconciler",
            [str(infra.BIN / "tandem"), "reconcile", "--interval", "1"],
        )
        processes.api(port)
        yield Stack(processes, f"http://127.0.0.1:{port}", api_key)
    finally:
        processes.stop_all()


def test_tandem_job_through_the_queues_matches_the_embedded_run(
    stack: Stack, in_process_settings
) -> None:
    from services.core.engines import Engines
    from services.core.requests import parse_job_request
    from services.core.runner import run_job

    job = stack.wait(stack.submit()["id"])
    assert job["status"] == "succeeded", job["error"]
    kinds = [stage["kind"] for stage in job["stages"]]
    assert kinds[0] == "classifier" and kinds[-1] == "executor"
    assert [s["seq"] for s in job["stages"]] == list(range(len(kinds)))

    request = parse_job_request({"question": QUESTION, "params": PARAMS}, 8000)
    engines = Engines(in_process_settings)
    try:
        embedded = run_job(request, engines)
    finally:
        engines.close()
    service_stages = [{k: s[k] for k in SAME_IN_BOTH} for s in job["stages"]]
    embedded_stages = [{k: getattr(s, k) for k in SAME_IN_BOTH} for s in embedded.stages]
    assert service_stages == embedded_stages
    assert [s["output"].get("text") for s in job["stages"]] == [
        s.output.get("text") for s in embedded.stages
    ]
    assert job["answer"] == embedded.outcome.answer
    assert job["cost"]["tflops"] == pytest.approx(embedded.cost.tflops)
    assert job["cost"]["generated_tokens"] == sum(s["generated_tokens"] for s in job["stages"])


def test_idempotent_submission_runs_once(stack: Stack) -> None:
    first = stack.submit(strategy="slm_only", **{"Idempotency-Key": "svc-once"})
    second = stack.submit(strategy="slm_only", **{"Idempotency-Key": "svc-once"})
    assert first["id"] == second["id"]
    job = stack.wait(first["id"])
    assert job["status"] == "succeeded" and len(job["stages"]) == 1


def test_cancel_stops_at_the_next_stage_boundary(stack: Stack) -> None:
    params = {
        "budgets": [0, 40, 80, 120],
        "executor_max_tokens": 64,
        "policy": "entropy",
        "cost_preference": 0.0,
    }
    job = stack.submit(params=params)
    stack.wait(job["id"], until=lambda j: len(j["stages"]) >= 1)
    stack.http.post(f"/v1/jobs/{job['id']}/cancel")
    done = stack.wait(job["id"])
    assert done["status"] == "cancelled"
    recorded = len(done["stages"])
    time.sleep(2)
    assert len(stack.job(job["id"])["stages"]) == recorded  # nothing ran after the cancel
    assert "executor" not in [s["kind"] for s in done["stages"]]


def test_worker_killed_mid_stage_the_job_still_succeeds_once(stack: Stack) -> None:
    params = {"budgets": [0], "executor_max_tokens": 160}
    job = stack.submit(strategy="slm_only", params=params)
    # Wait until the executor has claimed the stage (the job is running), then kill it.
    stack.wait(job["id"], until=lambda j: j["status"] == "running")
    time.sleep(0.5)
    stack.processes.kill("executor", signal.SIGKILL)
    stack.processes.worker("executor", name="executor")
    done = stack.wait(job["id"], timeout=300)
    assert done["status"] == "succeeded", done["error"]
    assert [s["seq"] for s in done["stages"]] == [0]  # recorded once
    assert done["stages"][0]["generated_tokens"] == done["cost"]["generated_tokens"]
