"""GET /metrics (Prometheus) and request timing for every API call.

Under gunicorn the API is several processes. `tandem api` runs them in prometheus_client's
multiprocess mode (`settings.prometheus_multiproc_dir`, a fresh directory per start, see
`services.observability.multiprocess_metrics_dir`): each process writes its counters and
histograms to files there, and a scrape answered by any process sums all of them
(`MultiProcessCollector`), dead processes' counts included. Without that directory (the
app in one process: tests, `flask run`) the default registry is served.

The scrape-time gauges (`StateCollector`) come from the sources of truth, not from the
files. Jobs by status and strategy is a GROUP BY over the jobs table, so each process
keeps its answer for `STATE_CACHE_S` seconds and runs at most one such query at a time:
scrapes every few seconds from several Prometheus replicas cost one query per process
per `STATE_CACHE_S`.
"""

from __future__ import annotations

import threading
import time

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from services.broker import BrokerUnavailable
from services.observability import HTTP_SECONDS
from services.storage.db import transaction
from services.storage.models import Job

bp = Blueprint("metrics", __name__)

STATE_CACHE_S = 5.0  # how long one process reuses its jobs-by-status count


class StateCollector:
    """Gauges read at scrape time from the sources of truth: jobs by status and strategy
    from Postgres (cached per process for STATE_CACHE_S), queue depth from Redis. Any API
    process gives the same answer."""

    def __init__(self, app: Flask, cache_s: float = STATE_CACHE_S) -> None:
        self.app = app
        self.cache_s = cache_s
        self._lock = threading.Lock()  # one query at a time; the others reuse its answer
        self._rows: list[tuple[str, str, int]] | None = None
        self._read_at = -float("inf")
        self.queries = 0  # Postgres queries run by this collector (for tests)

    def job_counts(self) -> list[tuple[str, str, int]] | None:
        """Jobs by (status, strategy), at most `cache_s` old; None if the database is down."""
        with self._lock:
            if time.monotonic() - self._read_at < self.cache_s:
                return self._rows
            settings = self.app.config["TANDEM"]
            try:
                with transaction(settings.database_url) as session:
                    query = select(Job.status, Job.strategy, func.count()).group_by(
                        Job.status, Job.strategy
                    )
                    self._rows = [(s, k, int(n)) for s, k, n in session.execute(query)]
            except Exception:  # a scrape must not fail because the database blinked
                self._rows = None
            self.queries += 1
            self._read_at = time.monotonic()
            return self._rows

    def collect(self):
        jobs = GaugeMetricFamily(
            "tandem_jobs", "Jobs by status and strategy", labels=["status", "strategy"]
        )
        for status, strategy, count in self.job_counts() or []:
            jobs.add_metric([status, strategy], count)
        yield jobs
        depth = GaugeMetricFamily(
            "tandem_queue_depth", "Messages waiting per queue", labels=["queue"]
        )
        try:
            for queue, count in self.app.extensions["tandem.admission"].broker.depths().items():
                depth.add_metric([queue], count)
        except BrokerUnavailable:
            pass
        yield depth


def init_app(app: Flask) -> None:
    state = CollectorRegistry(auto_describe=False)
    collector = StateCollector(app)
    state.register(collector)
    app.extensions["tandem.metrics"] = state
    app.extensions["tandem.metrics.state"] = collector
    app.extensions["tandem.metrics.processes"] = _process_registry(
        app.config["TANDEM"].prometheus_multiproc_dir
    )

    @app.before_request
    def _start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        started = g.get("started")
        if started is not None:
            endpoint = request.url_rule.rule if request.url_rule else "unmatched"
            HTTP_SECONDS.labels(request.method, endpoint, str(response.status_code)).observe(
                time.perf_counter() - started
            )
        return response

    app.register_blueprint(bp)


def _process_registry(multiproc_dir: str | None) -> CollectorRegistry:
    """The counters and histograms of every API process (multiprocess mode), else this
    process's default registry."""
    if not multiproc_dir:
        from prometheus_client import REGISTRY

        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=multiproc_dir)
    return registry


@bp.get("/metrics")
def metrics() -> Response:
    body = generate_latest(current_app.extensions["tandem.metrics.processes"]) + generate_latest(
        current_app.extensions["tandem.metrics"]
    )
    return Response(body, mimetype=CONTENT_TYPE_LATEST)
