"""Service-mode commands: `tandem api`, `tandem keys create|list|revoke`, `tandem reconcile`
(which also dispatches webhooks and purges), `tandem purge`."""

from __future__ import annotations

import logging
import time

import click

from services.settings import get_settings


def register(cli: click.Group) -> None:
    cli.add_command(api)
    cli.add_command(keys)
    cli.add_command(reconcile)
    cli.add_command(purge)


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
        "worker_class": _problem_worker(),  # gthread, answering unparsable requests as problems
        "timeout": 60,
        "keepalive": 5,  # longer than a poller's usual pause, so it reuses its connection
        "graceful_timeout": 30,
        "accesslog": None,
        "loglevel": "warning",
        "child_exit": mark_process_dead,
        "on_exit": lambda _server: remove_metrics_dir(metrics_dir),
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


@keys.command("list", help="List API keys: id, prefix, owner, created, last used, revoked.")
@click.option("--owner", help="Only this owner's keys.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line")
def keys_list(owner: str | None, as_json: bool) -> None:
    import json

    from sqlalchemy import select

    from services.storage.db import transaction
    from services.storage.models import ApiKey

    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    with transaction(get_settings().database_url) as session:
        rows = [_key_row(key) for key in session.scalars(query)]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    columns = ("id", "prefix", "owner", "created_at", "last_used_at", "revoked_at")
    table = [columns, *[tuple(row[c] or "-" for c in columns) for row in rows]]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(columns))]
    for line in table:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def _key_row(key) -> dict[str, str | None]:
    def when(moment) -> str | None:
        return moment.isoformat(timespec="seconds") if moment else None

    return {
        "id": key.id,
        "prefix": key.prefix,
        "owner": key.owner,
        "created_at": when(key.created_at),
        "last_used_at": when(key.last_used_at),
        "revoked_at": when(key.revoked_at),
    }


@keys.command(
    "revoke",
    help="Revoke the key whose prefix (as `keys list` shows it) or id is PREFIX. The API "
    "refuses it within TANDEM_KEY_CACHE_TTL_S.",
)
@click.argument("prefix")
def keys_revoke(prefix: str) -> None:
    from sqlalchemy import or_, select

    from services.storage.db import transaction
    from services.storage.models import ApiKey, utcnow

    prefix = prefix.strip()
    if len(prefix) < 5:
        raise click.ClickException("give at least 5 characters of the key's prefix (or its id)")
    with transaction(get_settings().database_url) as session:
        matches = list(
            session.scalars(
                select(ApiKey)
                .where(or_(ApiKey.id == prefix, ApiKey.prefix.startswith(prefix, autoescape=True)))
                .with_for_update()
            )
        )
        if not matches:
            raise click.ClickException(f"no API key with prefix or id {prefix!r} (see `tandem keys list`)")
        if len(matches) > 1:
            listed = ", ".join(f"{key.id} ({key.owner})" for key in matches)
            raise click.ClickException(f"{len(matches)} keys match {prefix!r}: {listed}; revoke one by its id")
        key = matches[0]
        if key.revoked_at is not None:
            click.echo(f"{key.id} ({key.prefix}..., {key.owner}) was already revoked")
            return
        key.revoked_at = utcnow()
    ttl = get_settings().key_cache_ttl_s
    click.echo(f"revoked {key.id} ({key.prefix}..., {key.owner}); refused within {ttl:g} s")


@click.command(
    help="Delete finished jobs (with their stages), finished batches and ended webhook "
    "deliveries older than DAYS, in short chunks; their costs stay in the usage rollups."
)
@click.option("--older-than", "days", type=click.FloatRange(min=0), required=True, help="DAYS")
@click.option("--chunk", type=click.IntRange(1, 10_000), default=500, show_default=True,
              help="Rows per transaction")
def purge(days: float, chunk: int) -> None:
    from datetime import timedelta

    from services.retention import purge as run_purge

    report = run_purge(get_settings().database_url, timedelta(days=days), chunk=chunk)
    click.echo(str(report))


@click.command(
    help="The reconciler: feed batches every TANDEM_FEED_INTERVAL_S, and re-send what was "
    "lost (jobs with no progress within the stage deadline) every --interval seconds. It "
    "also sends due webhook deliveries to their queue at every pass, and purges (deleted "
    "batches; with TANDEM_RETENTION_DAYS, what is older) in a thread of its own."
)
@click.option(
    "--interval", type=float, default=30.0, show_default=True, help="Seconds between passes"
)
@click.option(
    "--deadline", type=float, help="Seconds without progress. Default: TANDEM_STAGE_DEADLINE_S"
)
@click.option("--once", is_flag=True, help="One pass, then exit")
def reconcile(interval: float, deadline: float | None, once: bool) -> None:
    from services.batches import feed, fill
    from services.broker import Broker
    from services.jobs import reconcile as reconcile_pass
    from services.observability import serve_queue_depths, setup_logging
    from services.retention import start_purging
    from services.webhooks.dispatch import dispatch as dispatch_webhooks
    from workers.tasks import enqueue
    from workers.webhooks import publish as publish_webhooks
    from workers.webhooks import queue_depth as webhook_depth

    settings = get_settings()
    setup_logging(settings.log_level, settings.log_json)
    broker = Broker(settings.redis_url, cache_s=0)
    if settings.metrics_port and not once:  # KEDA scales the pools on these gauges
        serve_queue_depths(broker, settings.metrics_port)
    log = logging.getLogger("tandem.reconciler")
    depth = broker.depth
    if not once:
        start_purging(settings)
    last_pass = float("-inf")
    while True:
        fed = 0
        try:
            budget = settings.feed_interval_s
            if time.monotonic() - last_pass >= interval or once:
                last_pass = time.monotonic()
                count = reconcile_pass(settings, enqueue, deadline, depth)
                fed = feed(settings, enqueue, depth, broker.capacity, budget_s=budget)
            else:
                fed = fill(settings, enqueue, depth, broker.capacity, budget_s=budget)
            if once:
                sent = dispatch_webhooks(settings, publish_webhooks, webhook_depth)
                click.echo(f"re-enqueued {count} job(s); dispatched {sent} webhook(s)")
                return
        except Exception as error:  # keep the loop alive through a database or broker outage
            if once:
                raise
            log.warning("pass failed: %s", error)
        try:
            dispatch_webhooks(settings, publish_webhooks, webhook_depth)
        except Exception as error:
            log.warning("webhook dispatch failed: %s", error)
        # While batches are being fed, top their lanes up often: they are kept shallow.
        time.sleep(min(settings.feed_interval_s, 0.1) if fed else settings.feed_interval_s)
