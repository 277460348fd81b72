"""The dashboard: its JSON API over real Postgres (Flask test client), and the page itself in
headless Chromium (Playwright) against a live API with real workers."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask.testing import FlaskClient

from tests import infra

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
ARTIFACTS = infra.ROOT / "artifacts"


# --- rows written through the models, as the workers write them -------------------------


def stage(seq: int, kind: str, tokens: int, **output: Any):
    from services.core.steps import StageRecord

    role = "classifier" if kind == "classifier" else kind
    return StageRecord(
        seq=seq, kind=kind, role=role, model="SmolLM2-135M-Instruct", prompt_tokens=40,
        generated_tokens=tokens, tflops=2 * 135e6 * tokens / 1e12, prefill_tflops=0.01,
        latency_s=0.5, note=f"{kind} {seq}", output=output,
    )  # fmt: skip


TANDEM_STAGES = [
    ("classifier", 0, {"probability": 0.41, "threshold": 0.85, "sufficient": False}),
    ("coordinator", 64, {"text": "Goal: add.", "finish_reason": "length"}),
    ("classifier", 0, {"probability": 0.77, "threshold": 0.7, "sufficient": True}),
    ("executor", 120, {"text": "3 + 4 = \\boxed{7}", "finish_reason": "stop"}),
]


def add_job(url: str, owner: str, strategy: str, status: str, stages=(), **job: Any) -> str:
    from services.core.requests import parse_job_request
    from services.core.steps import Outcome
    from services.storage import job_rows, stage_rows
    from services.storage.db import transaction

    request = parse_job_request({"question": job.pop("question", QUESTION),
                                 "strategy": strategy}, 8000)  # fmt: skip
    with transaction(url) as session:
        row = job_rows.new_job(owner, request, status="running", **job)
        session.add(row)
        session.flush()
        for seq, (kind, tokens, output) in enumerate(stages):
            stage_rows.add_stage(session, row.id, stage(seq, kind, tokens, **output))
        if status == "succeeded":
            tandem = strategy == "tandem"
            summary = {"stopped_at_stage": 1, "coordinator_tokens": 64} if tandem else {}
            job_rows.mark_succeeded(session, row.id, Outcome("7", "\\boxed{7}", summary))
        row.status = status
        return row.id


def add_batch(url: str, owner: str) -> str:
    """A batch in progress: 2 of 4 jobs done, one running, one queued (rows inserted directly,
    the way the batch feeder leaves them; no worker is asked to run them)."""
    from services.storage.db import transaction
    from services.storage.models import Batch, utcnow

    with transaction(url) as session:
        batch = Batch(owner=owner, status="in_progress", total_lines=4, started_at=utcnow())
        session.add(batch)
        session.flush()
        batch_id = batch.id
    done = [("executor", 50, {"text": "\\boxed{7}", "finish_reason": "stop"})]
    for line, status in enumerate(("succeeded", "succeeded", "running", "queued"), start=1):
        stages = done if status == "succeeded" else ()
        add_job(url, owner, "slm_only", status, stages, batch_id=batch_id, line=line)
    return batch_id


def new_owner(url: str) -> tuple[str, str]:
    from services.api.auth import create_key
    from services.storage.db import transaction

    owner = f"dash-{uuid.uuid4().hex[:8]}"
    with transaction(url) as session:
        return owner, create_key(session, owner)


def write_report(folder: Path, label: str = "tandem") -> Path:
    """An evaluation report as `tandem eval` writes it, from rows of known content."""
    from services.evaluation.harness import StrategySpec
    from services.evaluation.metrics import summarize
    from services.evaluation.report import write_report as write

    folder.mkdir(parents=True, exist_ok=True)
    specs = [StrategySpec(label, "tandem"), StrategySpec("llm_only", "llm_only")]
    rows = [
        {"strategy": s.label, "question_id": str(i), "correct": i < 2, "latency_s": 1.0,
         "cost": {"tflops": 0.05 if s.label == "llm_only" else 0.03, "prefill_tflops": 0.01},
         "generated_by_role": {"coordinator": 10, "executor": 20}, "outcome": {},
         "models": {"executor": "SmolLM2-135M-Instruct"}}
        for s in specs for i in range(4)
    ]  # fmt: skip
    write(folder, summarize(rows, specs, dataset="/data/gsm8k_test.jsonl", n_questions=4))
    return folder


# --- the JSON API -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(in_process_settings):
    from services.api import create_app

    return create_app(in_process_settings, enqueue=lambda tasks: None)


@pytest.fixture
def client(app) -> FlaskClient:
    app.config.pop("TANDEM_EVAL_DIR", None)
    return app.test_client()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_page_and_assets_are_served_with_a_strict_policy(client: FlaskClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert b"/dashboard/static/dashboard.js" in page.data
    for asset, kind in (("dashboard.js", "javascript"), ("dashboard.css", "css")):
        response = client.get(f"/dashboard/static/{asset}")
        assert response.status_code == 200 and kind in response.mimetype
        response.close()
    page.close()


def test_the_json_api_needs_a_key(client: FlaskClient) -> None:
    for path in ("/v1/dashboard/overview", "/v1/dashboard/jobs/job_x", "/v1/dashboard/report"):
        response = client.get(path)
        assert response.status_code == 401 and response.mimetype == "application/problem+json"


def test_overview_counts_batches_and_cost(client: FlaskClient, in_process_settings) -> None:
    url = in_process_settings.database_url
    owner, key = new_owner(url)
    batch_id = add_batch(url, owner)
    tandem = add_job(url, owner, "tandem", "succeeded", TANDEM_STAGES)
    _other, other_key = new_owner(url)

    body = client.get("/v1/dashboard/overview", headers=auth(key)).get_json()
    assert body["jobs"]["counts"] == {
        "queued": 1, "running": 1, "succeeded": 3, "failed": 0, "cancelled": 0
    }  # fmt: skip
    assert body["jobs"]["generated_tokens"] == 50 + 50 + 64 + 120
    assert body["jobs"]["tflops"] == pytest.approx(2 * 135e6 * 284 / 1e12)
    [batch] = body["batches"]
    assert batch["id"] == batch_id and batch["status"] == "in_progress"
    assert (batch["done"], batch["total"], batch["progress"]) == (2, 4, 0.5)
    assert batch["cost"]["generated_tokens"] == 100
    assert body["recent_jobs"][0]["id"] == tandem
    assert body["recent_jobs"][0]["stopped_at_stage"] == 1
    assert {s["strategy"]: s["succeeded"] for s in body["strategies"]} == {
        "slm_only": 2, "tandem": 1
    }  # fmt: skip
    assert body["report"] == {"available": False, "configured": False}

    theirs = client.get("/v1/dashboard/overview", headers=auth(other_key)).get_json()
    assert theirs["jobs"]["total"] == 0 and theirs["batches"] == []
    assert client.get(f"/v1/dashboard/jobs/{tandem}", headers=auth(other_key)).status_code == 404
    bad = client.get("/v1/dashboard/overview?hours=0", headers=auth(key))
    assert bad.status_code == 400 and "hours" in bad.get_json()["detail"]


def test_timeline_stop_reason_and_saving(
    client: FlaskClient, app, in_process_settings, tmp_path: Path
) -> None:
    url = in_process_settings.database_url
    owner, key = new_owner(url)
    tandem = add_job(url, owner, "tandem", "succeeded", TANDEM_STAGES)
    body = client.get(f"/v1/dashboard/jobs/{tandem}", headers=auth(key)).get_json()
    assert [s["kind"] for s in body["stages"]] == [k for k, _, _ in TANDEM_STAGES]
    assert [(s["decision"] or {}).get("verdict") for s in body["stages"]] == [
        "continue", None, "stop", None
    ]  # fmt: skip
    assert body["stop"]["seq"] == 2 and body["stop"]["stage"] == 1
    assert "sufficient after 64 coordinator tokens" in body["stop"]["reason"]
    assert body["saving"]["basis"] == "unknown" and "llm_only" in body["saving"]["explanation"]

    app.config["TANDEM_EVAL_DIR"] = str(write_report(tmp_path / "reports" / "run1").parent)
    estimated = client.get(f"/v1/dashboard/jobs/{tandem}", headers=auth(key)).get_json()
    assert estimated["saving"]["basis"] == "estimated"
    assert estimated["saving"]["coordinator_alone_tflops"] == pytest.approx(0.05)
    assert "run1" in estimated["saving"]["explanation"]

    alone = [("coordinator", 400, {"text": "\\boxed{7}", "finish_reason": "stop"})]
    llm = add_job(url, owner, "llm_only", "succeeded", alone)
    measured = client.get(f"/v1/dashboard/jobs/{tandem}", headers=auth(key)).get_json()
    saving = measured["saving"]
    assert saving["basis"] == "measured" and saving["job_id"] == llm
    assert saving["saving"] == pytest.approx(1 - 184 / 400)
    itself = client.get(f"/v1/dashboard/jobs/{llm}", headers=auth(key)).get_json()
    assert itself["saving"]["basis"] == "self"
    assert itself["stop"]["reason"] == "the coordinator answered alone (llm_only)"


def test_latest_report_is_rendered_and_its_plot_served(
    client: FlaskClient, app, api_key: str, tmp_path: Path
) -> None:
    reports = tmp_path / "reports"
    app.config["TANDEM_EVAL_DIR"] = str(reports)
    missing = client.get("/v1/dashboard/report", headers=auth(api_key))
    assert missing.status_code == 404 and "no evaluation report" in missing.get_json()["detail"]

    write_report(reports / "older")
    time.sleep(0.05)
    write_report(reports / "newer", label="tandem<script>")
    os.utime(reports / "older" / "summary.json", (1, 1))
    body = client.get("/v1/dashboard/report", headers=auth(api_key)).get_json()
    assert body["name"] == "newer"
    assert "<table>" in body["table_html"] and "<th>accuracy [95% CI]</th>" in body["table_html"]
    assert "tandem&lt;script&gt;" in body["table_html"] and "<script>" not in body["table_html"]
    plot = client.get(body["pareto_url"], headers=auth(api_key))
    assert plot.status_code == 200 and plot.data[:4] == b"\x89PNG"
    plot.close()
    brief = client.get("/v1/dashboard/overview", headers=auth(api_key)).get_json()["report"]
    assert brief["available"] and brief["name"] == "newer"


def test_markdown_rendering_escapes_and_builds_tables() -> None:
    from services.api.dashboard import render_markdown

    html = render_markdown("# Title\n\nSome `code` & <b>.\n\n| a | b |\n|---|---|\n| 1 | <i> |\n")
    assert html.splitlines()[0] == "<h2>Title</h2>"
    assert "<p>Some <code>code</code> &amp; &lt;b&gt;.</p>" in html
    assert "<thead><tr><th>a</th><th>b</th></tr></thead>" in html
    assert "<tbody><tr><td>1</td><td>&lt;i&gt;</td></tr></tbody>" in html


# --- the page in a browser ----------------------------------------------------------------

BROWSER_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
PARAMS = {"budgets": [0, 8, 16], "executor_max_tokens": 16, "llm_max_tokens": 24}


class Live:
    def __init__(self, base_url: str, key: str) -> None:
        self.base_url = base_url
        self.key = key
        self.http = httpx.Client(base_url=base_url, headers=auth(key), timeout=30)

    def submit(self, strategy: str) -> str:
        body = {"question": QUESTION, "strategy": strategy, "params": PARAMS}
        response = self.http.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def wait(self, job_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture(scope="module")
def live(service_env, in_process_settings, tmp_path_factory) -> Iterator[Live]:
    url = in_process_settings.database_url
    owner, key = new_owner(url)
    reports = tmp_path_factory.mktemp("reports")
    write_report(reports / "gsm8k-smoke")
    env = {**service_env, "TANDEM_EVAL_DIR": str(reports), "TANDEM_LOCAL_THREADS": "1"}
    processes = infra.Processes(env, Path(tmp_path_factory.mktemp("dashboard-logs")))
    port = infra.free_port()
    try:
        for queue in ("coordinator", "classifier", "executor"):
            processes.worker(queue)
        processes.api(port)
        live = Live(f"http://127.0.0.1:{port}", key)
        live.owner = owner  # type: ignore[attr-defined]
        yield live
    finally:
        processes.stop_all()


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system Chromium the browser test drives (session scope: checked before `live`
    starts any process)."""
    path = "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.skip(f"Chromium is not installed ({path}): run scripts/install_test_deps.sh")
    return path


@pytest.mark.slow
@pytest.mark.model
def test_dashboard_in_a_browser(chromium: str, live: Live, in_process_settings) -> None:
    from playwright.sync_api import expect, sync_playwright

    tandem = live.submit("tandem")
    llm = live.submit("llm_only")
    for job_id in (tandem, llm):
        assert live.wait(job_id)["status"] == "succeeded"
    batch_id = add_batch(in_process_settings.database_url, live.owner)  # type: ignore[attr-defined]
    stages = live.http.get(f"/v1/jobs/{tandem}").json()["stages"]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{live.base_url}/dashboard")

            page.fill("#key", "tdm_wrong")
            page.click("#key-form button")
            expect(page.locator("#login-error")).to_have_text("the API key was refused")
            errors.clear()  # the 401 is logged by the browser; it is expected

            page.fill("#key", live.key)
            page.click("#key-form button")
            expect(page.get_by_test_id("count-succeeded")).to_have_text("4")
            expect(page.get_by_test_id("count-running")).to_have_text("1")
            expect(page.get_by_test_id("count-queued")).to_have_text("1")
            batch_row = page.locator(f"tr[data-batch='{batch_id}']")
            expect(batch_row).to_contain_text("in_progress")
            expect(batch_row).to_contain_text("2 / 4")
            assert page.locator("#jobs tbody tr").count() == 6

            page.click(f"tr[data-job='{tandem}'] a")
            expect(page.locator("#job")).to_be_visible()
            expect(page.locator("#job-id")).to_have_text(tandem)
            rows = page.locator("#timeline tbody tr")
            expect(rows).to_have_count(len(stages))
            expect(rows.first).to_have_attribute("data-stage", "classifier")
            expect(rows.last).to_have_attribute("data-stage", "executor")
            expect(page.locator("#job-saving")).to_contain_text("measured: llm_only job")
            expect(page.locator("#job-stop")).not_to_be_empty()

            page.click("#report-link")
            expect(page.locator("#report-table table")).to_contain_text("llm_only")
            expect(page.locator("#report-plot")).to_be_visible()
            page.wait_for_function("document.getElementById('report-plot').naturalWidth > 0")
            expect(page.locator("#job")).to_be_hidden()
            page.locator(f"tr[data-job='{tandem}'] a").click()  # back to the job
            expect(page.locator("#job")).to_be_visible()
            expect(rows).to_have_count(len(stages))
            expect(page.locator("#report-table table")).to_be_visible()

            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"dashboard screenshot: {shot}")
            assert errors == []
            assert json.loads(page.evaluate("JSON.stringify(Object.keys(sessionStorage))")) == [
                "tandem.apiKey"
            ]
        finally:
            browser.close()
