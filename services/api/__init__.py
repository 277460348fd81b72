"""The REST API: a Flask app factory with one blueprint per resource."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flask import Flask

from services.settings import Settings, get_settings


def create_app(
    settings: Settings | None = None,
    enqueue: Callable[[Sequence], None] | None = None,
) -> Flask:
    from services.api import docs, health, jobs, problems
    from services.api.admission import Admission
    from services.api.auth import KeyCache
    from services.api.limits import RateLimiter
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
    for blueprint in (health.bp, jobs.bp, docs.bp):
        app.register_blueprint(blueprint)
    _register_optional(app)
    return app


def _register_optional(app: Flask) -> None:
    """Blueprints that live in their own modules (batches, dashboard, metrics)."""
    from services.optional import present

    for module in present("services.api.batches", "services.api.dashboard", "services.api.metrics"):
        module.init_app(app)
