"""`tandem grade`: run code answers against a HumanEval-format dataset's tests, sandboxed.

Without ``--solutions`` it grades the dataset's own canonical solutions: a check of the
dataset and of the sandbox before GPU time is spent on it. With ``--solutions`` (JSONL of
``task_id``, ``completion``; a completion may be a body, a function or a whole model reply)
it grades those, in their order.

Output: one JSON line per item on stdout (``task_id``, ``verdict``, ``reason``, ``seconds``),
then one summary line on stderr. Exit status 0 when every item was graded, whatever the
verdicts (a failed candidate is a result, not an error of the command); 2 with ``--strict``
when any item is not ``passed``; 1 with a one-line error for an unreadable dataset or
solutions file, a task_id the dataset lacks, or a host that cannot sandbox.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

import click

from services.grading.humaneval import (
    DatasetError,
    Grader,
    Problem,
    load_problems,
    load_solutions,
)
from services.grading.sandbox import SandboxUnavailable, limits_from_settings
from services.settings import get_settings

VERDICTS = ("passed", "failed", "timeout", "error")


def register(cli: click.Group) -> None:
    cli.add_command(grade)


@click.command(
    "grade",
    help=(
        "Run code answers against a HumanEval-format dataset's tests in a sandbox and print "
        "one JSON line per item (task_id, verdict, reason, seconds). Without --solutions, "
        "grades the dataset's canonical solutions."
    ),
)
@click.option(
    "--dataset",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="HumanEval JSONL: task_id, prompt, entry_point, test, canonical_solution",
)
@click.option(
    "--solutions",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL of task_id, completion (a body, a function or a whole reply)",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1, max=256),
    help="Sandboxes at once [TANDEM_GRADER_WORKERS; default one per core]",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.1, max=3600),
    help="Wall-clock seconds per item [TANDEM_GRADER_TIMEOUT_S]",
)
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N items")
@click.option("--strict", is_flag=True, help="Exit status 2 when any item is not passed")
def grade(
    dataset: Path,
    solutions: Path | None,
    workers: int | None,
    timeout_s: float | None,
    limit: int | None,
    strict: bool,
) -> None:
    settings = get_settings()
    try:
        problems = load_problems(dataset)
        items = _items(problems, solutions)
    except DatasetError as error:
        raise click.ClickException(str(error)) from None
    if limit is not None:
        items = items[:limit]
    limits = limits_from_settings(settings)
    if timeout_s is not None:
        limits = dataclasses.replace(limits, timeout_s=timeout_s)
    try:
        grader = Grader(limits, workers or settings.grader_workers or None, settings.grader_python)
    except SandboxUnavailable as error:
        raise click.ClickException(str(error)) from None

    started = time.monotonic()
    counts: Counter[str] = Counter()
    for result in grader.grade_many(items):
        counts[result.verdict] += 1
        click.echo(json.dumps(result.to_json()))
    total = sum(counts.values())
    share = 100 * counts["passed"] / total if total else 0.0
    click.echo(
        f"tandem grade: {total} items: "
        + ", ".join(f"{counts[verdict]} {verdict}" for verdict in VERDICTS)
        + f" ({share:.1f}% passed) in {time.monotonic() - started:.1f} s"
        + f" with {grader.workers} worker{'s' if grader.workers > 1 else ''}",
        err=True,
    )
    if strict and counts["passed"] != total:
        sys.exit(2)


def _items(problems: list[Problem], solutions: Path | None) -> list[tuple[Problem, str | None]]:
    if solutions is None:
        return [(problem, None) for problem in problems]
    by_id = {problem.task_id: problem for problem in problems}
    items: list[tuple[Problem, str | None]] = []
    for solution in load_solutions(solutions):
        if solution.task_id not in by_id:
            raise DatasetError(
                f"{solution.where}: task_id {solution.task_id!r} is not in the dataset"
            )
        items.append((by_id[solution.task_id], solution.completion))
    return items
