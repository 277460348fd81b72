"""Prometheus metrics and structured (JSON) logs, shared by the API and the workers.

Metric names (the Grafana dashboard in dashboards/grafana.json is built on them):
- tandem_jobs{status,strategy}                gauge, from Postgres at scrape time (API)
- tandem_queue_depth{queue}                   gauge, Redis list length at scrape time (API)
- tandem_stage_seconds{kind,model}            histogram, one observation per recorded stage
- tandem_tokens_total{model,type}             counter, type = prompt | cached | generated
- tandem_tflops_total{model,metric}           counter, metric = paper | prefill
- tandem_stage_retries_total{queue}           counter, redeliveries after an error
- tandem_reconciler_requeued_total            counter, jobs re-enqueued by the reconciler
- tandem_stage_wasted_total{reason}           counter, stages that ran but were not recorded
- tandem_stage_queued_seconds{kind}           histogram, a stage's message granted -> started
- tandem_job_seconds{strategy,status}         histogram, a job submitted -> ended (observed by
                                              the worker that ends it)
- tandem_stages_in_flight{queue}              gauge, stages running in this worker process
- tandem_http_request_seconds{method,endpoint,status}   histogram (API)

The API's gunicorn processes share their counts through prometheus_client's multiprocess
mode: `multiprocess_metrics_dir()` makes the directory (before the processes start) and
`mark_process_dead` is gunicorn's `child_exit` hook.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from services.core.steps import StageRecord

STAGE_SECONDS = Histogram(
    "tandem_stage_seconds",
    "Stage run time on its worker",
    ["kind", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
TOKENS = Counter("tandem_tokens_total", "Tokens processed by stages", ["model", "type"])
TFLOPS = Counter("tandem_tflops_total", "TFLOPs spent by stages", ["model", "metric"])
RETRIES = Counter("tandem_stage_retries_total", "Stage redeliveries after an error", ["queue"])
REQUEUED = Counter("tandem_reconciler_requeued_total", "Jobs re-enqueued by the reconciler")
WASTED = Counter(
    "tandem_stage_wasted_total",
    "Stage executions that ran but were not recorded (a lost lease, a cancel, a finished job)",
    ["reason"],
)
STAGE_QUEUED = Histogram(
    "tandem_stage_queued_seconds",
    "Time a stage waited between being granted (its message sent) and starting on a worker",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
JOB_SECONDS = Histogram(
    "tandem_job_seconds",
    "Job latency from submission to its end",
    ["strategy", "status"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 14400, 86400),
)
IN_FLIGHT = Gauge("tandem_stages_in_flight", "Stages running in this worker process", ["queue"])
HTTP_SECONDS = Histogram(
    "tandem_http_request_seconds",
    "API request latency",
    ["method", "endpoint", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class QueueDepths:
    """tandem_queue_depth{queue}: messages waiting in every stage queue (every lane), read
    from Redis at scrape time. Served by the reconciler (KEDA scales each pool on waiting
    plus in-flight work); the API serves the same gauge from its own collector."""

    def __init__(self, broker) -> None:
        self.broker = broker

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "tandem_queue_depth", "Messages waiting per queue", labels=["queue"]
        )
        try:
            for queue, count in self.broker.depths().items():
                family.add_metric([queue], count)
        except Exception:  # a scrape must not fail because Redis blinked
            pass
        yield family


def serve_queue_depths(broker, port: int) -> None:
    """This process's /metrics on `port`, with the queue depths."""
    from prometheus_client import REGISTRY, start_http_server

    REGISTRY.register(QueueDepths(broker))
    start_http_server(port)


def multiprocess_metrics_dir() -> str:
    """A fresh, empty directory for prometheus_client's multiprocess mode, exported as
    PROMETHEUS_MULTIPROC_DIR to the processes started after this call (files of an earlier
    run would otherwise be summed into this one's counts)."""
    from prometheus_client import values

    directory = tempfile.mkdtemp(prefix="tandem-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    # Metric values created from now on (in this process and its children) go to files,
    # even if prometheus_client was imported before the directory existed.
    values.ValueClass = values.get_value_class()
    return directory


def mark_process_dead(_server: Any, worker: Any) -> None:
    """gunicorn `child_exit` hook: drop a dead process's live gauges (its counters and
    histograms stay counted)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def remove_metrics_dir(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def observe_stage(record: StageRecord) -> None:
    STAGE_SECONDS.labels(record.kind, record.model).observe(record.latency_s)
    TOKENS.labels(record.model, "prompt").inc(record.prompt_tokens)
    TOKENS.labels(record.model, "cached").inc(record.cached_prompt_tokens)
    TOKENS.labels(record.model, "generated").inc(record.generated_tokens)
    TFLOPS.labels(record.model, "paper").inc(record.tflops)
    TFLOPS.labels(record.model, "prefill").inc(record.prefill_tflops)


# --- logs -------------------------------------------------------------------------------

CONTEXT_FIELDS = ("job_id", "seq", "stage", "owner", "queue", "batch_id", "attempt")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the job context passed
    with `extra=`. Question text is never among the fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(entry, default=str)


def setup_logging(level: str = "INFO", json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
