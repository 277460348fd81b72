"""The `tandem` command: embedded runs, the API, workers' helpers, keys and the database."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from services.core.backends.base import BackendError
from services.core.requests import (
    InvalidJSON,
    InvalidRequest,
    JobRequest,
    parse_job_request,
    read_json,
)
from services.settings import Settings, get_settings

EXPECTED_ERRORS: tuple[type[Exception], ...] = (InvalidRequest, BackendError, OSError)


class Fail(click.ClickException):
    """A one-line error for the user: no traceback, non-zero exit."""

    def format_message(self) -> str:
        return self.message


def main() -> None:
    try:
        cli.main(prog_name="tandem", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("tandem: aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        click.echo(f"tandem: error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except EXPECTED_ERRORS as error:
        click.echo(f"tandem: error: {error}", err=True)
        sys.exit(1)
    except Exception as error:  # the last line of defence: one line, not a traceback
        click.echo(f"tandem: error: {type(error).__name__}: {error}", err=True)
        sys.exit(1)


@click.group(help="Tandem: a large model writes the first insights, a small one finishes.")
def cli() -> None:
    pass


def _request_from_options(
    question: str,
    strategy: str,
    budgets: str | None,
    preference: str | None,
    params_json: str | None,
    settings: Settings,
    task: str | None = None,
) -> JobRequest:
    params: dict[str, Any] = {}
    if params_json:
        try:
            params = read_json(params_json)  # as the API reads a body
        except InvalidJSON as error:
            raise InvalidRequest(f"--params is not valid JSON: {error}") from None
        if not isinstance(params, dict):
            raise InvalidRequest("--params must be a JSON object")
    if budgets is not None:
        try:
            params["budgets"] = [int(b) for b in budgets.split(",") if b.strip()]
        except ValueError:
            raise InvalidRequest(
                f"--budgets must be comma-separated whole numbers, e.g. 0,100,500 (got {budgets!r})"
            ) from None
    if preference is not None:
        try:
            params["cost_preference"] = float(preference)
        except ValueError:
            params["cost_preference"] = preference
    if task is not None:
        params["task"] = task
    data = {"question": question, "strategy": strategy, "params": params}
    return parse_job_request(data, settings.max_question_chars)


@cli.command(help="Run one job in this process and print its answer and per-stage cost.")
@click.argument("question")
@click.option(
    "--strategy",
    default="tandem",
    show_default=True,
    help="tandem | llm_only | slm_only | fixed:N | scot | relay",
)
@click.option(
    "--task",
    type=click.Choice(["math", "code", "text"]),
    help="What the answer is: math (\\boxed{}, the default), code (one Python function: "
    "the question is its signature and docstring; entry_point via --params), text (free form)",
)
@click.option("--budgets", help="Coordinator token budgets per stage, e.g. 0,100,500,1000")
@click.option("--cost-preference", "preference", help="quality | balanced | economy | a lambda")
@click.option("--params", "params_json", help="Job params as a JSON object")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object")
@click.option("--no-record", is_flag=True, help="Do not record the job in the database")
def run(
    question: str,
    strategy: str,
    task: str | None,
    budgets: str | None,
    preference: str | None,
    params_json: str | None,
    as_json: bool,
    no_record: bool,
) -> None:
    from services.core.engines import Engines
    from services.core.runner import run_job
    from services.embedded import Recorder

    settings = get_settings()
    request = _request_from_options(
        question, strategy, budgets, preference, params_json, settings, task
    )
    engines = Engines(settings)
    recorder = None if no_record else Recorder(settings.database_url, request)
    try:
        result = run_job(request, engines, on_stage=recorder.stage if recorder else None)
    except Exception as error:
        if recorder:
            recorder.failed(str(error))
        raise
    finally:
        engines.close()
    if recorder:
        recorder.succeeded(result.outcome)
    payload = result.to_json()
    if recorder:
        payload["job_id"] = recorder.job_id
    if as_json:
        click.echo(json.dumps(payload, indent=2))
    else:
        from services.report import stage_table

        click.echo(stage_table(payload))


@cli.group(help="Database schema (Alembic).")
def db() -> None:
    pass


@db.command("upgrade", help="Apply migrations up to head (builds an empty database).")
def db_upgrade() -> None:
    from services.storage.db import upgrade

    url = get_settings().database_url
    upgrade(url)
    click.echo(f"database at {_redact(url)} is at head")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def register_commands() -> None:
    """The command groups that live beside their adapters, registered in plain sight."""
    from services import batch_cli, classifier_cli
    from services.api import commands as service_commands
    from services.evaluation import cli as eval_cli
    from services.grading import cli as grading_cli

    for module in (service_commands, classifier_cli, batch_cli, eval_cli, grading_cli):
        module.register(cli)


register_commands()
