"""`tandem eval`: strategies on a dataset, accuracy (pass@1 for code) against cost."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from services.evaluation.harness import (
    EmbeddedRunner,
    EvaluationError,
    Runner,
    ServiceRunner,
    load_questions,
    parse_strategies,
    run_evaluation,
    with_dataset_task,
)


def register(cli: click.Group) -> None:
    cli.add_command(evaluate)


@click.command(
    "eval",
    help=(
        "Run each strategy on the same questions, check the answers and write results.jsonl, "
        "summary.json, table.md and pareto.png. Resumable: rows already in results.jsonl "
        "are kept. A strategy may name a Tandem operating point: tandem@economy, tandem@0.5. "
        "On a HumanEval file every job is a code job (task and entry_point set per problem) "
        "and its answer is graded here in a sandbox (TANDEM_GRADER_*): pass@1."
    ),
)
@click.option(
    "--dataset",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL in GSM8K (question, answer with ####), MATH (question, answer, ...) or "
    "HumanEval (task_id, prompt, entry_point, test: code, graded in a sandbox) form",
)
@click.option(
    "--strategies",
    default="tandem,llm_only,slm_only",
    show_default=True,
    help="Comma-separated: tandem[@POINT], llm_only, slm_only, fixed:N, scot, relay",
)
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N questions")
@click.option("--params", "params_json", help="Job params for every strategy, a JSON object")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder. Default: eval-out/<dataset name>",
)
@click.option(
    "--services",
    "services_url",
    help="Run through a service at this URL instead of in this process",
)
@click.option("--key", envvar="TANDEM_API_KEY", help="API key for --services [TANDEM_API_KEY]")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    help="Jobs in flight. Default: TANDEM_LOCAL_MAX_BATCH here, 32 with --services",
)
@click.option(
    "--baseline",
    default="llm_only",
    show_default=True,
    help="The strategy label savings are measured against",
)
@click.option("--retry-errors", is_flag=True, help="Run again the rows that ended in an error")
@click.option("--no-progress", is_flag=True, help="No progress bar")
def evaluate(
    dataset: Path,
    strategies: str,
    limit: int | None,
    params_json: str | None,
    out_dir: Path | None,
    services_url: str | None,
    key: str | None,
    concurrency: int | None,
    baseline: str,
    retry_errors: bool,
    no_progress: bool,
) -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # one-off timeout notices
    try:
        questions = load_questions(dataset, limit)
        specs = parse_strategies(strategies, with_dataset_task(_params(params_json), questions))
        out_dir = out_dir or Path("eval-out") / dataset.stem
        runner = _runner(services_url, key, concurrency, out_dir)
    except EvaluationError as error:
        raise click.ClickException(str(error)) from None
    try:
        if isinstance(runner, EmbeddedRunner):
            runner.check(specs)
        result = run_evaluation(
            questions,
            specs,
            runner,
            out_dir,
            dataset=str(dataset),
            baseline=baseline,
            progress=not no_progress,
            retry_errors=retry_errors,
        )
    except EvaluationError as error:
        raise click.ClickException(str(error)) from None
    finally:
        runner.close()
    click.echo((out_dir / "table.md").read_text(encoding="utf-8"))
    click.echo(
        f"ran {result.ran} job(s), kept {result.skipped} from earlier runs; outputs in {out_dir}/"
    )


def _params(params_json: str | None) -> dict[str, Any]:
    if not params_json:
        return {}
    try:
        params = json.loads(params_json)
    except json.JSONDecodeError as error:
        raise click.ClickException(f"--params is not valid JSON: {error.msg}") from None
    if not isinstance(params, dict):
        raise click.ClickException("--params must be a JSON object")
    return params


def _runner(
    services_url: str | None, key: str | None, concurrency: int | None, out_dir: Path
) -> Runner:
    if services_url:
        if not key:
            raise EvaluationError("--services needs an API key: --key KEY or TANDEM_API_KEY")
        return ServiceRunner(
            services_url, key, concurrency=concurrency or 32, run_tag=str(out_dir.resolve())
        )
    from services.settings import get_settings

    return EmbeddedRunner(get_settings(), concurrency)
