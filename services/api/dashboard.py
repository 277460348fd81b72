"""The dashboard: one static page (`/dashboard`: HTML, vanilla JS and CSS, no build step)
over a small read-only JSON API under /v1/dashboard, with the same Bearer keys as the rest
of the API (the page asks for the key and keeps it in sessionStorage).

- `GET /v1/dashboard/overview`: the owner's jobs by status with tokens and TFLOPs in a time
  window, the latest batches with progress and cost so far, the latest jobs;
- `GET /v1/dashboard/jobs/{id}`: a job's stage timeline, what stopped the coordinator, and
  the saving against the coordinator alone (measured, or estimated, or why not known);
- `GET /v1/dashboard/report` (+ `/pareto.png`): the latest evaluation report found under
  the eval reports directory (`TANDEM_EVAL_DIR`), its table rendered as HTML.
"""

from __future__ import annotations

import html
import json
import os
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, send_file
from sqlalchemy import select
from sqlalchemy.orm import Session

from services import batches
from services.api.auth import authenticate
from services.api.docs import ERRORS, add_paths
from services.api.formats import iso
from services.api.jobs import owned_job
from services.api.problems import Problem
from services.storage import costs, job_rows, usage_rows
from services.storage.costs import StageSums
from services.storage.db import transaction
from services.storage.models import Batch, Job, Stage, utcnow
from services.storage.statuses import ACTIVE_JOB_STATUSES, JobStatus

STATIC = Path(__file__).resolve().parent / "static" / "dashboard"
LISTED = 20  # batches and jobs shown on the overview
MAX_WINDOW_HOURS = 24 * 90
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)

page = Blueprint(
    "dashboard", __name__, static_folder=str(STATIC), static_url_path="/dashboard/static"
)
api = Blueprint("dashboard_api", __name__, url_prefix="/v1/dashboard")


def database_url() -> str:
    return current_app.config["TANDEM"].database_url


# --- the page ---------------------------------------------------------------------------


@page.get("/dashboard")
def dashboard_page() -> Response:
    response = send_file(STATIC / "index.html", mimetype="text/html", max_age=0)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


# --- overview ---------------------------------------------------------------------------


@api.get("/overview")
def overview() -> Response:
    owner = authenticate()
    hours = _hours(request.args.get("hours", "24"))
    since = utcnow() - timedelta(hours=hours)
    with transaction(database_url()) as session:
        body = {
            "object": "dashboard.overview",
            "window_hours": hours,
            "jobs": job_totals(session, owner, since),
            "strategies": strategy_totals(session, owner, since),
            "batches": latest_batches(session, owner),
            "recent_jobs": recent_jobs(session, owner),
        }
    body["report"] = report_brief()
    return jsonify(body)


def _hours(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_WINDOW_HOURS:
        raise Problem(400, f"hours must be a whole number from 1 to {MAX_WINDOW_HOURS}")
    return int(raw)


def job_totals(session: Session, owner: str, since: datetime) -> dict[str, Any]:
    """The owner's jobs created in the window by status, with their cost: the rows still
    stored plus the usage rollups of those deleted (retention, DELETE)."""
    in_window = (Job.owner == owner, Job.created_at >= since)
    counts = job_rows.status_counts(session, *in_window)
    cost = costs.over_jobs(session, *in_window)
    for (_strategy, status), values in usage_rows.window(session, owner, since).items():
        counts[status] = counts.get(status, 0) + int(values[0])
        cost = usage_rows.plus(cost, usage_rows.as_sums(values))
    return {"counts": counts, "total": sum(counts.values()), **cost.to_dict()}


def strategy_totals(session: Session, owner: str, since: datetime) -> list[dict[str, Any]]:
    """Per strategy, succeeded jobs in the window (stored and rolled up): how many, and
    mean TFLOPs per job."""
    succeeded = (Job.owner == owner, Job.created_at >= since, Job.status == JobStatus.SUCCEEDED)
    merged = {strategy: (jobs, cost) for strategy, jobs, cost in costs.by_strategy(session, *succeeded)}
    for (strategy, status), values in usage_rows.window(session, owner, since).items():
        if status == JobStatus.SUCCEEDED:
            jobs, cost = merged.get(strategy, (0, StageSums()))
            rolled = usage_rows.as_sums(values)
            merged[strategy] = (jobs + int(values[0]), usage_rows.plus(cost, rolled))
    return [
        {
            "strategy": strategy,
            "succeeded": jobs,
            "mean_tflops": round(cost.tflops / jobs, 9) if jobs else 0.0,
            "mean_generated_tokens": round(cost.generated_tokens / jobs, 2) if jobs else 0,
        }
        for strategy, (jobs, cost) in sorted(merged.items())
    ]


def latest_batches(session: Session, owner: str) -> list[dict[str, Any]]:
    latest = session.scalars(
        select(Batch)
        .where(Batch.owner == owner, Batch.deleted_at.is_(None))
        .order_by(Batch.created_at.desc(), Batch.id.desc())
        .limit(LISTED)
    )
    return [_batch_entry(batch, batches.progress(session, batch)) for batch in latest]


def _batch_entry(batch: Batch, progress: batches.Progress) -> dict:
    counts = progress.counts
    done = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    jobs = sum(counts[status] for status in JobStatus)
    total = max(batch.total_lines - batch.invalid_lines, jobs)
    return {
        "id": batch.id,
        "status": batch.status,
        "strategy": batch.strategy,
        "total": total,
        "done": done,
        "progress": round(done / total, 4) if total else 0.0,
        "counts": counts,
        "cost": progress.cost,
        "created_at": iso(batch.created_at),
        "finished_at": iso(batch.finished_at),
    }


def recent_jobs(session: Session, owner: str) -> list[dict[str, Any]]:
    jobs = list(
        session.scalars(
            select(Job)
            .where(Job.owner == owner)
            .order_by(Job.created_at.desc(), Job.id.desc())
            .limit(LISTED)
        )
    )
    sums = costs.by_job(session, [job.id for job in jobs])
    return [_job_entry(job, sums.get(job.id, StageSums())) for job in jobs]


def _job_entry(job: Job, cost: StageSums) -> dict[str, Any]:
    summary = job.summary or {}
    return {
        "id": job.id,
        "strategy": job.strategy,
        "status": job.status,
        "question": _clip(job.question, 140),
        "answer": job.answer,
        "stopped_at_stage": summary.get("stopped_at_stage"),
        "batch_id": job.batch_id,
        "created_at": iso(job.created_at),
        **cost.to_dict(),
    }


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- a job's stage timeline ---------------------------------------------------------------


@api.get("/jobs/<job_id>")
def job_timeline(job_id: str) -> Response:
    owner = authenticate()
    with transaction(database_url()) as session:
        job = owned_job(session, job_id, owner)
        stages = [_timeline_row(stage) for stage in job.stages]
        tflops = sum(stage["tflops"] for stage in stages)
        body = {
            "object": "dashboard.job",
            "id": job.id,
            "status": job.status,
            "strategy": job.strategy,
            "question": job.question,
            "answer": job.answer,
            "error": job.error,
            "params": job.params,
            "batch_id": job.batch_id,
            "created_at": iso(job.created_at),
            "finished_at": iso(job.finished_at),
            "stages": stages,
            "totals": {
                "generated_tokens": sum(stage["generated_tokens"] for stage in stages),
                "tflops": round(tflops, 9),
                "prefill_tflops": round(sum(s["prefill_tflops"] for s in stages), 9),
            },
            "stop": stop_reason(job, stages),
            "saving": coordinator_alone(session, job, tflops),
        }
    return jsonify(body)


def _timeline_row(stage: Stage) -> dict[str, Any]:
    output = stage.output or {}
    row = {
        "seq": stage.seq,
        "kind": stage.kind,
        "role": stage.role,
        "model": stage.model,
        "prompt_tokens": stage.prompt_tokens,
        "cached_prompt_tokens": stage.cached_prompt_tokens,
        "generated_tokens": stage.generated_tokens,
        "tflops": stage.tflops,
        "prefill_tflops": stage.prefill_tflops,
        "latency_s": round(stage.latency_s, 3),
        "note": stage.note,
        "decision": None,
    }
    if "probability" in output:
        verdict = "stop" if output.get("sufficient") else "continue"
        row["decision"] = {
            "verdict": verdict,
            "probability": output.get("probability"),
            "threshold": output.get("threshold"),
            "policy": output.get("policy"),
        }
    elif output.get("finish_reason"):
        row["finish_reason"] = output["finish_reason"]
    return row


def stop_reason(job: Job, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Which stage stopped the coordinator, and why."""
    summary = job.summary or {}
    coordinator = [s for s in stages if s["role"] == "coordinator"]
    stops = [s for s in stages if (s["decision"] or {}).get("verdict") == "stop"]
    tokens = summary.get("coordinator_tokens", sum(s["generated_tokens"] for s in coordinator))
    result = {"stage": summary.get("stopped_at_stage"), "coordinator_tokens": tokens, "seq": None}
    if job.strategy == "llm_only":
        result["reason"] = "the coordinator answered alone (llm_only)"
    elif stops:
        verdict = stops[0]["decision"]
        result["seq"] = stops[0]["seq"]
        result["reason"] = (
            f"the classifier judged the insights sufficient after {tokens} coordinator tokens "
            f"(p={verdict['probability']:.3f} >= threshold {verdict['threshold']})"
        )
    elif coordinator and coordinator[-1].get("finish_reason") == "stop":
        result["seq"] = coordinator[-1]["seq"]
        result["reason"] = f"the coordinator ended its insights itself after {tokens} tokens"
    elif coordinator:
        result["seq"] = coordinator[-1]["seq"]
        result["reason"] = f"the last budget was reached ({tokens} coordinator tokens)"
    elif any(s["kind"] == "executor" for s in stages):
        result["reason"] = "the executor answered without coordinator insights"
    else:
        result["reason"] = "not decided yet" if job.status in ACTIVE_JOB_STATUSES else "n/a"
    return result


def coordinator_alone(session: Session, job: Job, tflops: float) -> dict[str, Any]:
    """The saving against the coordinator (LLM) solving alone: measured from an llm_only run
    of the same question by this owner, else estimated from the latest evaluation report's
    llm_only mean, else unknown (and why)."""
    if job.strategy == "llm_only":
        return {"basis": "self", "explanation": "this job is the coordinator alone"}
    measured = costs.latest_succeeded(session, job.owner, "llm_only", job.question)
    if measured and measured[1].tflops > 0:
        note = f"measured: llm_only job {measured[0]} on the same question"
        return _saving("measured", measured[1].tflops, tflops, note, job_id=measured[0])
    report = latest_report()
    base = _report_baseline(report) if report else None
    if base:
        note = (
            f"estimated: mean llm_only TFLOPs per question in evaluation report "
            f"{report.name} ({base['n']} questions of {base['dataset']})"
        )
        return _saving("estimated", base["mean_tflops"], tflops, note)
    return {
        "basis": "unknown",
        "explanation": "no llm_only run of this question and no evaluation report with "
        "llm_only: submit the question with strategy llm_only, or run `tandem eval` into "
        "the reports directory (TANDEM_EVAL_DIR)",
    }


def _saving(basis: str, alone: float, tflops: float, note: str, **extra: Any) -> dict:
    return {
        "basis": basis,
        "coordinator_alone_tflops": round(alone, 9),
        "tflops": round(tflops, 9),
        "saving": round(1 - tflops / alone, 6),
        "explanation": note,
        **extra,
    }


def _report_baseline(report: Path) -> dict[str, Any] | None:
    summary = _read_summary(report)
    for entry in (summary or {}).get("strategies", []):
        if entry.get("label") == "llm_only" and entry.get("n") and entry.get("mean_tflops"):
            return {**entry, "dataset": Path(str(summary.get("dataset", ""))).name}
    return None


# --- evaluation reports ----------------------------------------------------------------------


def eval_dir() -> Path | None:
    """The eval reports directory: settings' `eval_dir` when it exists, else the app config
    or the environment's TANDEM_EVAL_DIR."""
    settings = current_app.config["TANDEM"]
    configured = (
        getattr(settings, "eval_dir", None)
        or current_app.config.get("TANDEM_EVAL_DIR")
        or os.environ.get("TANDEM_EVAL_DIR")
    )
    return Path(configured) if configured else None


def latest_report() -> Path | None:
    """The folder with the newest summary.json: the reports directory itself or one of its
    subfolders (one per `tandem eval --out`)."""
    root = eval_dir()
    if root is None or not root.is_dir():
        return None
    candidates = [root, *(child for child in root.iterdir() if child.is_dir())]
    found: list[tuple[float, Path]] = []
    for path in candidates:
        summary = path / "summary.json"
        if summary.is_file():
            found.append((summary.stat().st_mtime, path))
    return max(found, key=lambda item: item[0])[1] if found else None


def _read_summary(report: Path) -> dict[str, Any] | None:
    try:
        return json.loads((report / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def report_brief() -> dict[str, Any]:
    report = latest_report()
    summary = _read_summary(report) if report else None
    if report is None or summary is None:
        return {"available": False, "configured": eval_dir() is not None}
    return {
        "available": True,
        "name": report.name,
        "generated_at": summary.get("generated_at"),
        "dataset": Path(str(summary.get("dataset", ""))).name,
        "url": "/v1/dashboard/report",
    }


@api.get("/report")
def report() -> Response:
    authenticate()
    folder = _require_report()
    summary = _read_summary(folder) or {}
    table = folder / "table.md"
    markdown = table.read_text(encoding="utf-8") if table.is_file() else ""
    return jsonify(
        {
            "object": "dashboard.report",
            "name": folder.name,
            "generated_at": summary.get("generated_at"),
            "dataset": summary.get("dataset"),
            "summary": summary,
            "table_markdown": markdown,
            "table_html": render_markdown(markdown),
            "pareto_url": "/v1/dashboard/report/pareto.png"
            if (folder / "pareto.png").is_file()
            else None,
        }
    )


@api.get("/report/pareto.png")
def report_plot() -> Response:
    authenticate()
    plot = _require_report() / "pareto.png"
    if not plot.is_file():
        raise Problem(404, "the latest evaluation report has no pareto.png")
    return send_file(plot, mimetype="image/png", max_age=0)


def _require_report() -> Path:
    folder = latest_report()
    if folder is None:
        where = eval_dir()
        detail = (
            f"no evaluation report (summary.json) under {where.name or where}"
            if where
            else "no evaluation reports directory: set TANDEM_EVAL_DIR"
        )
        raise Problem(404, detail)
    return folder


# --- a small markdown renderer (headings, paragraphs, pipe tables, `code`) ---------------


def render_markdown(text: str) -> str:
    blocks: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
        elif line.startswith("|"):
            table = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                table.append(lines[i].strip())
                i += 1
            blocks.append(_table(table))
        elif match := re.match(r"(#{1,6})\s+(.*)", line):
            level = min(len(match.group(1)) + 1, 6)  # the page has its own h1
            blocks.append(f"<h{level}>{_inline(match.group(2))}</h{level}>")
            i += 1
        else:
            paragraph = []
            while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith("|"):
                paragraph.append(lines[i].strip())
                i += 1
            blocks.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    return "\n".join(blocks)


def _table(lines: list[str]) -> str:
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    body = [row for row in rows[1:] if not all(re.fullmatch(r":?-+:?", c) for c in row)]
    head = "".join(f"<th>{_inline(cell)}</th>" for cell in rows[0])
    cells = (
        "<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row) + "</tr>" for row in body
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(cells)}</tbody></table>"


def _inline(text: str) -> str:
    escaped = html.escape(text, quote=True)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


# --- OpenAPI ---------------------------------------------------------------------------------

_JSON = {"content": {"application/json": {"schema": {"type": "object"}}}}

add_paths(
    {
        "/v1/dashboard/overview": {
            "get": {
                "summary": "Dashboard: jobs by status, batches with progress and cost so far",
                "parameters": [
                    {
                        "name": "hours",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_WINDOW_HOURS},
                    }
                ],
                "responses": {"200": {"description": "the overview", **_JSON}, **ERRORS},
            }
        },
        "/v1/dashboard/jobs/{job_id}": {
            "get": {
                "summary": "Dashboard: a job's stage timeline and saving vs the coordinator",
                "parameters": [
                    {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": {"description": "the timeline", **_JSON}, **ERRORS},
            }
        },
        "/v1/dashboard/report": {
            "get": {
                "summary": "Dashboard: the latest evaluation report (table and summary)",
                "responses": {"200": {"description": "the report", **_JSON}, **ERRORS},
            }
        },
        "/v1/dashboard/report/pareto.png": {
            "get": {
                "summary": "Dashboard: the latest evaluation report's accuracy/TFLOPs plot",
                "responses": {
                    "200": {
                        "description": "PNG",
                        "content": {
                            "image/png": {"schema": {"type": "string", "format": "binary"}}
                        },
                    },
                    **ERRORS,
                },
            }
        },
    }
)
