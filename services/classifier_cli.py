"""`tandem classifier ...`: collect training data, train, evaluate and inspect the trained
sufficiency classifier. The work itself is in `services.core.classifier` (see its package
docstring); collecting through a running deployment in `services.collect_remote`. This
layer adds the options, the progress bar and one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from services.core.classifier.artifact import (
    load_artifact,
    read_manifest,
    report_path,
    write_report,
)
from services.core.classifier.cascade import format_report
from services.core.classifier.collect import CollectError, CollectSummary, Grade, Item
from services.core.classifier.samples import TrainingError, load_samples


class ClassifierCommandError(click.ClickException):
    """A one-line error for the user (no traceback)."""

    def format_message(self) -> str:
        return self.message


@click.group(help="The trained sufficiency classifier: collect data, train, evaluate.")
def classifier() -> None:
    pass


def register(cli: click.Group) -> None:
    cli.add_command(classifier)


def _budgets(raw: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in raw.split(",") if b.strip())
    except ValueError:
        raise click.BadParameter(
            f"comma-separated whole numbers, e.g. 0,100,500 (got {raw!r})"
        ) from None


@classifier.command(
    help="Run every stage of each question and store features, labels, costs. On a HumanEval "
    "file the stages are code jobs, labelled by running the answer against the problem's "
    "tests in a sandbox (TANDEM_GRADER_*)."
)
@click.option(
    "--dataset",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="JSONL with `question` and `answer` (GSM8K / MATH-500), or HumanEval "
    "(task_id, prompt, entry_point, test).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for samples.jsonl + meta.json (resumed if it exists).",
)
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N questions.")
@click.option(
    "--offset",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Skip the first K questions of the dataset.",
)
@click.option(
    "--budgets",
    default="0,100,500,1000",
    show_default=True,
    help="Coordinator token budgets per stage.",
)
@click.option(
    "--executor-max-tokens", type=click.IntRange(1, 32768), default=512, show_default=True
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Questions in flight at once (the engines batch their requests).",
)
@click.option(
    "--services",
    "services_url",
    help="Collect through the API at this URL (fixed:B jobs) instead of embedded.",
)
@click.option("--key", envvar="TANDEM_API_KEY", help="API key for --services.")
@click.option(
    "--poll-s",
    type=float,
    default=1.0,
    show_default=True,
    help="Polling interval for --services jobs.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def collect(
    dataset: Path,
    out: Path,
    limit: int | None,
    offset: int,
    budgets: str,
    executor_max_tokens: int,
    workers: int,
    services_url: str | None,
    key: str | None,
    poll_s: float,
    no_progress: bool,
) -> None:
    from services.core.classifier import collect as collecting
    from services.core.engines import Engines
    from services.core.params import JobParams
    from services.settings import get_settings

    if services_url and not key:
        raise ClassifierCommandError("--services needs --key (or TANDEM_API_KEY)")
    try:
        params = JobParams(budgets=_budgets(budgets), executor_max_tokens=executor_max_tokens)
    except ValueError as error:
        raise ClassifierCommandError(f"invalid options: {error}") from None
    try:
        items = collecting.read_dataset(dataset)[offset:]
    except CollectError as error:
        raise ClassifierCommandError(str(error)) from None
    items = items[:limit] if limit else items
    task = collecting.dataset_task(items)
    grade = _code_grade() if task == "code" else None
    engines = Engines(get_settings())
    collector = None
    bar = _ProgressBar(enabled=not no_progress)
    try:
        if services_url:
            from services.collect_remote import ServicesCollector

            collector = ServicesCollector(
                services_url, key or "", engines, poll_s=poll_s, grade=grade
            )
            collect_one = collector.collect_question
        else:

            def collect_one(item: Item, p: JobParams) -> dict[str, Any]:
                return collecting.collect_question(engines, item, p, grade)

        mode = "services" if services_url else "embedded"
        meta = collecting.collect_meta(dataset, params, engines, mode, task)
        summary = collecting.collect(items, out, params, collect_one, meta, workers, bar)
    except (CollectError, TrainingError) as error:
        raise ClassifierCommandError(str(error)) from None
    finally:
        bar.close()
        if collector:
            collector.close()
        engines.close()
    click.echo(
        f"{summary.collected} questions collected now, {summary.done_before} before, "
        f"{summary.total} asked: {summary.path}"
    )


def _code_grade() -> Grade:
    """Labels for code stages: the answer run against the problem's tests in a sandbox, at
    most TANDEM_GRADER_WORKERS at once (the sandbox is checked here, before any model work)."""
    import threading

    from services.grading.humaneval import Grader, Problem
    from services.grading.sandbox import SandboxUnavailable, limits_from_settings
    from services.settings import get_settings

    settings = get_settings()
    try:
        grader = Grader(
            limits_from_settings(settings), settings.grader_workers or None, settings.grader_python
        )
    except SandboxUnavailable as error:
        raise ClassifierCommandError(f"code answers cannot be graded here: {error}") from None
    slots = threading.BoundedSemaphore(grader.workers)

    def grade(item: Item, candidate: str) -> tuple[bool, dict[str, Any]]:
        with slots:
            result = grader.grade(Problem(**(item.problem or {})), candidate)
        return result.verdict == "passed", {
            "verdict": result.verdict,
            "grade_reason": result.reason,
        }

    return grade


class _ProgressBar:
    """`collect`'s progress callback as a tqdm bar (opened at the first call)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def __call__(self, summary: CollectSummary) -> None:
        if self._bar is not None:
            self._bar.update(summary.done_before + summary.collected - self._bar.n)
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=summary.total,
            initial=summary.done_before + summary.collected,
            unit="q",
            desc="collect",
            disable=not self.enabled,
            dynamic_ncols=True,
            smoothing=0.1,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@classifier.command(help="Train the classifier and its thresholds; write the artifact.")
@click.option(
    "--data",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="A `collect` output directory (or its samples.jsonl).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Artifact file to write (a zip; the report goes to <out>.report.json).",
)
@click.option("--folds", type=click.IntRange(2, 20), default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def train(data: Path, out: Path, folds: int, seed: int, as_json: bool) -> None:
    from services.core.classifier.training import train_artifact

    try:
        artifact, report = train_artifact(data, out, folds=folds, seed=seed)
    except TrainingError as error:
        raise ClassifierCommandError(str(error)) from None
    _print_report(report, as_json)
    presets = ", ".join(f"{k}={v:.4g}" for k, v in artifact.presets.items())
    click.echo(f"artifact: {out} (presets, lambda per TFLOP: {presets})")
    click.echo(f"report:   {report_path(out)}")


@classifier.command(
    help="Report a trained cascade on data it was not trained on (another dataset or task: "
    "a classifier trained on GSM8K over HumanEval samples is the math-to-code transfer), "
    "per operating point against the fixed stages and the oracle."
)
@click.option("--artifact", type=click.Path(path_type=Path), required=True)
@click.option("--data", type=click.Path(exists=True, path_type=Path), required=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the report as JSON here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def evaluate(artifact: Path, data: Path, out: Path | None, as_json: bool) -> None:
    from services.core.classifier.training import evaluate as evaluate_on

    loaded = load_artifact(artifact)
    try:
        samples = load_samples(data)
        report = evaluate_on(loaded, samples)
    except TrainingError as error:
        raise ClassifierCommandError(str(error)) from None
    report["transfer"] = _transfer(loaded.manifest, samples.meta)
    if not as_json:
        click.echo(_transfer_line(report["transfer"]))
    _print_report(report, as_json)
    if out:
        write_report(out, report)


def _transfer(manifest: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Which task and dataset the artifact was trained on, and which the data comes from
    (artifacts and collections made before tasks existed are math)."""
    provenance = manifest.get("provenance") or {}
    return {
        "trained_on": {"task": provenance.get("task", "math"), "dataset": provenance.get("dataset")},
        "evaluated_on": {"task": meta.get("task", "math"), "dataset": meta.get("dataset")},
    }


def _transfer_line(transfer: dict[str, Any]) -> str:
    def name(side: dict[str, Any]) -> str:
        return f"{side['task']} ({Path(side['dataset']).name if side['dataset'] else '?'})"

    return f"trained on {name(transfer['trained_on'])}, evaluated on {name(transfer['evaluated_on'])}"


@classifier.command(help="Show an artifact's manifest (checked against this code).")
@click.argument("artifact", type=click.Path(path_type=Path))
def inspect(artifact: Path) -> None:
    manifest = read_manifest(artifact)
    manifest.pop("report", None)
    click.echo(json.dumps(manifest, indent=2))


def _print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(format_report(report))
    if "warning" in report:
        click.echo(f"warning: {report['warning']}")
