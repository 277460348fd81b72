"""Service-mode commands: `tandem api`, `tandem keys create`, `tandem reconcile`."""

from __future__ import annotations

import logging
import time

import click

from services.settings import get_settings


def register(cli: click.Group) -> None:
    cli.add_command(api)
    cli.add_command(keys)
    cli.add_command(reconcile)


@click.command(help="Serve the REST API (gunicorn, threaded workers).")
@click.option("--host", help="Default: TANDEM_API_HOST")
@click.option("--port", type=int, help="Default: TANDEM_API_PORT")
@click.option("--workers", type=int, help="Processes. Default: TANDEM_API_WORKERS")
@click.option("--threads", type=int, help="Threads per process. Default: TANDEM_API_THREADS")
def api(host: str | None, port: int | None, workers: int | None, threads: int | None) -> None:
    from gunicorn.app.base import BaseApplication

    from services.api import create_app
    from services.observability import setup_logging

    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    options = {
        "bind": f"{host or settings.api_host}:{port or settings.api_port}",
        "workers": workers or settings.api_workers,
        "threads": threads or settings.api_threads,
        "worker_class": _problem_worker(),  # gthread, answering unparsable requests as problems
        "timeout": 60,
        "keepalive": 5,  # longer than a poller's usual pause, so it reuses its connection
        "graceful_timeout": 30,
        "accesslog": None,
        "loglevel": "warning",
        # gunicorn's own limits (its defaults, stated): a request past them is answered by
        # the worker below as problem+json (414, 431), not gunicorn's HTML page.
        "limit_request_line": 8190,
        "limit_request_fields": 100,
        "limit_request_field_size": 8190,
    }

    class Server(BaseApplication):
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            return create_app(settings)

    Server().run()


def _problem_worker() -> type:
    """gunicorn's threaded worker, answering a request it cannot parse (a URL or headers
    over the limits, a malformed request line) with an application/problem+json body."""
    import contextlib

    from gunicorn import util
    from gunicorn.workers.gthread import ThreadWorker

    from services.api.problems import unparsed_request_response

    class ProblemWorker(ThreadWorker):
        def handle_error(self, req, client, addr, exc) -> None:
            response = unparsed_request_response(exc, self.cfg)
            if response is None:
                return super().handle_error(req, client, addr, exc)
            self.log.warning("invalid request from %s: %s", (addr or ("?",))[0], exc)
            with contextlib.suppress(OSError):
                util.write_nonblock(client, response)
            return None

    return ProblemWorker


@click.group(help="API keys.")
def keys() -> None:
    pass


@keys.command("create", help="Create an API key for an owner and print it (shown once).")
@click.option("--owner", required=True, help="Tenant name; jobs are visible only to their owner.")
def keys_create(owner: str) -> None:
    from services.api.auth import create_key
    from services.storage.db import transaction

    owner = owner.strip()
    if not owner or len(owner) > 200:
        raise click.BadParameter("owner must be 1 to 200 characters", param_hint="--owner")
    with transaction(get_settings().database_url) as session:
        key = create_key(session, owner)
    click.echo(key)


@click.command(
    help="The reconciler: feed batches every TANDEM_FEED_INTERVAL_S, and re-send what was "
    "lost (jobs with no progress within the stage deadline) every --interval seconds."
)
@click.option(
    "--interval", type=float, default=30.0, show_default=True, help="Seconds between passes"
)
@click.option(
    "--deadline", type=float, help="Seconds without progress. Default: TANDEM_STAGE_DEADLINE_S"
)
@click.option("--once", is_flag=True, help="One pass, then exit")
def reconcile(interval: float, deadline: float | None, once: bool) -> None:
    from services.batches import feed
    from services.broker import Broker
    from services.jobs import reconcile as reconcile_pass
    from services.observability import serve_queue_depths, setup_logging
    from workers.tasks import enqueue

    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    broker = Broker(settings.redis_url, cache_s=0)
    if settings.metrics_port and not once:  # KEDA scales the pools on these gauges
        serve_queue_depths(broker, settings.metrics_port)
    log = logging.getLogger("tandem.reconciler")
    depth = broker.depth
    last_pass = float("-inf")
    while True:
        try:
            if time.monotonic() - last_pass >= interval or once:
                last_pass = time.monotonic()
                count = reconcile_pass(settings, enqueue, deadline, depth, broker.capacity)
                if once:
                    click.echo(f"re-enqueued {count} job(s)")
                    return
            else:
                feed(settings, enqueue, depth, broker.capacity, budget_s=settings.feed_interval_s)
        except Exception as error:  # keep the loop alive through a database or broker outage
            if once:
                raise
            log.warning("pass failed: %s", error)
        time.sleep(settings.feed_interval_s)
