"""GET /metrics (Prometheus) and request timing for every API call."""

from __future__ import annotations

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


class StateCollector:
    """Gauges read at scrape time from the sources of truth: jobs by status and strategy
    from Postgres, queue depth from Redis. Any API process gives the same answer."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self):
        settings = self.app.config["TANDEM"]
        jobs = GaugeMetricFamily(
            "tandem_jobs", "Jobs by status and strategy", labels=["status", "strategy"]
        )
        try:
            with transaction(settings.database_url) as session:
                rows = session.execute(
                    select(Job.status, Job.strategy, func.count()).group_by(
                        Job.status, Job.strategy
                    )
                )
                for status, strategy, count in rows:
                    jobs.add_metric([status, strategy], count)
        except Exception:  # a scrape must not fail because the database blinked
            pass
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
    state.register(StateCollector(app))
    app.extensions["tandem.metrics"] = state

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


@bp.get("/metrics")
def metrics() -> Response:
    from prometheus_client import REGISTRY

    body = generate_latest(REGISTRY) + generate_latest(current_app.extensions["tandem.metrics"])
    return Response(body, mimetype=CONTENT_TYPE_LATEST)
