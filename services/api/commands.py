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
    from services.observability import (
        mark_process_dead,
        multiprocess_metrics_dir,
        remove_metrics_dir,
        setup_logging,
    )

    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    metrics_dir = multiprocess_metrics_dir()  # /metrics sums every process's counts
    settings = settings.model_copy(update={"prometheus_multiproc_dir": metrics_dir})
    options = {
        "bind": f"{host or settings.api_host}:{port or settings.api_port}",
        "workers": workers or settings.api_workers,
        "threads": threads or settings.api_threads,
        "worker_class": "gthread",
        "timeout": 60,
        "keepalive": 5,  # longer than a poller's usual pause, so it reuses its connection
        "graceful_timeout": 30,
        "accesslog": None,
        "loglevel": "warning",
        "child_exit": mark_process_dead,
        "on_exit": lambda _server: remove_metrics_dir(metrics_dir),
    }

    class Server(BaseApplication):
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            return create_app(settings)

    Server().run()


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


@click.command(help="Re-enqueue jobs that made no progress within the stage deadline.")
@click.option(
    "--interval", type=float, default=30.0, show_default=True, help="Seconds between passes"
)
@click.option(
    "--deadline", type=float, help="Seconds without progress. Default: TANDEM_STAGE_DEADLINE_S"
)
@click.option("--once", is_flag=True, help="One pass, then exit")
def reconcile(interval: float, deadline: float | None, once: bool) -> None:
    from services.broker import Broker
    from services.jobs import reconcile as reconcile_pass
    from services.observability import setup_logging
    from workers.tasks import enqueue

    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    if settings.metrics_port and not once:  # tandem_reconciler_requeued_total lives here
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port)
    broker = Broker(settings.redis_url, cache_s=0)
    while True:
        try:
            count = reconcile_pass(
                settings, enqueue, deadline, lambda queue: broker.depths()[queue]
            )
            if once:
                click.echo(f"re-enqueued {count} job(s)")
                return
        except Exception as error:  # keep the loop alive through a database or broker outage
            if once:
                raise
            logging.getLogger("tandem.reconciler").warning("pass failed: %s", error)
        time.sleep(interval)
