"""The REST API: a Flask app factory; every blueprint is registered here, in plain sight.

    health      /healthz, /readyz
    jobs        /v1/jobs
    batches     /v1/batches (OpenAI-format batches too: services/api/openai/batches.py)
    openai      /v1/models, /v1/chat/completions, /v1/files (services/api/openai)
    dashboard   /dashboard and /v1/dashboard
    metrics     /metrics, and request timing for every route
    docs        /openapi.json and /docs
    webhooks    /v1/webhook_endpoints
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flask import Flask

from services.settings import Settings, get_settings


def create_app(
    settings: Settings | None = None,
    enqueue: Callable[[Sequence], None] | None = None,
) -> Flask:
    from services.api import (
        batches,
        dashboard,
        docs,
        health,
        jobs,
        metrics,
        openai,
        problems,
        webhooks,
    )
    from services.api.admission import Admission
    from services.api.auth import KeyCache
    from services.api.limits import RateLimiter
    from services.api.openai import batches as openai_batches
    from services.broker import Broker

    settings = settings or get_settings()
    app = Flask(__name__)
    app.config["TANDEM"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    if enqueue is None:
        from workers.tasks import enqueue
    app.extensions["tandem.enqueue"] = enqueue
    app.extensions["tandem.keys"] = KeyCache()
    app.extensions["tandem.rate"] = RateLimiter(settings.redis_url, settings.rate_limit_per_minute)
    app.extensions["tandem.admission"] = Admission(
        Broker(settings.redis_url), settings.max_queue_depth
    )
    problems.install(app)
    metrics.init_app(app)
    batches.init_app(app)
    blueprints = (
        health.bp,
        jobs.bp,
        batches.bp,
        openai.bp,
        webhooks.bp,
        dashboard.page,
        dashboard.api,
        docs.bp,
    )
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    # OpenAI-format batches share the native /v1/batches routes: a JSON POST, an OpenAI-made
    # batch's GET and cancel, and the list are answered by the OpenAI API (docs/openai.md).
    app.before_request(openai_batches.take_over)
    return app
