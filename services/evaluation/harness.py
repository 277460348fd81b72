"""The evaluation harness: every strategy on the same questions, one result row each.

Datasets: GSM8K and MATH lines (math questions, checked against the gold answer), or
HumanEval's own format (`task_id`, `prompt`, `entry_point`, `test`, `canonical_solution`:
code problems; every job runs with `task: code` and the problem's `entry_point`, and its
answer is graded in a sandbox by this process, `checks.py`).

Rows go to `results.jsonl` as they finish (each appended durably, `services.core.jsonl`), so a
run that stops can be resumed: pairs (strategy label, question id) already there are
skipped. Jobs run either in this process (`EmbeddedRunner`: `run_job` from a thread pool,
so the local engine batches concurrent questions) or through a running service
(`ServiceRunner`: submit and poll with `services.client.TandemClient`). No web framework
or queue imports.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from services.client import APIError, TandemClient
from services.core import jsonl
from services.core.answers import reference_answer
from services.core.params import PRESETS
from services.core.requests import InvalidRequest, parse_job_request
from services.evaluation.checks import AnswerChecker

if TYPE_CHECKING:
    from services.grading.humaneval import Grader

RESULTS_FILE = "results.jsonl"
_VALIDATION_QUESTION = "1 + 1 = ?"


class EvaluationError(ValueError):
    """A problem the user can fix (dataset, strategies, output folder): the message says how."""


# --- questions ------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    index: int
    id: str
    text: str
    reference: str | None  # math: the gold answer; code: None (the tests decide)
    level: str | None = None
    task: str = "math"  # "math" or "code"
    problem: Any = None  # code: the services.grading Problem its answer is graded against

    @property
    def job_params(self) -> dict[str, Any]:
        """Params this question adds to every job of it (code: the function's name)."""
        return {"entry_point": self.problem.entry_point} if self.task == "code" else {}


HUMANEVAL_FIELDS = ("task_id", "prompt", "entry_point", "test")


def load_questions(path: Path, limit: int | None = None) -> list[Question]:
    """GSM8K lines (`question`, `answer` ending `#### n`), MATH lines (`question` or
    `problem`, `answer`, `solution`, `level`, `unique_id`), or HumanEval lines (code), in
    file order. The first line decides the format; a file mixing them is refused."""
    questions: list[Question] = []
    try:
        for where, record in jsonl.objects(path):
            if not questions and _is_humaneval(record):
                return _code_questions(path, limit)
            if limit is not None and len(questions) >= limit:
                break
            questions.append(_question(where, record, len(questions)))
    except OSError as error:
        raise EvaluationError(f"cannot read dataset {path}: {error.strerror}") from None
    except jsonl.BadObject as error:
        raise EvaluationError(str(error)) from None
    if not questions:
        raise EvaluationError(f"dataset {path} has no questions")
    return questions


def _question(where: str, record: dict[str, Any], index: int) -> Question:
    text = record.get("question") or record.get("problem")
    if not isinstance(text, str) or not text.strip() or "answer" not in record:
        raise EvaluationError(
            f"{where}: needs 'question' (or 'problem') and 'answer' (or, for code, "
            f"HumanEval's {', '.join(HUMANEVAL_FIELDS)})"
        )
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    qid = str(record.get("unique_id") or record.get("id") or f"{index}-{digest}")
    level = record.get("level")
    return Question(
        index, qid, text, reference_answer(record), None if level is None else str(level)
    )


def _is_humaneval(record: dict[str, Any]) -> bool:
    return all(name in record for name in HUMANEVAL_FIELDS)


def _code_questions(path: Path, limit: int | None) -> list[Question]:
    from services.grading.humaneval import DatasetError, load_problems

    try:
        problems = load_problems(path)
    except DatasetError as error:
        raise EvaluationError(f"{error} (the file's first line is a HumanEval problem)") from None
    return [
        Question(index, problem.task_id, problem.prompt, None, task="code", problem=problem)
        for index, problem in enumerate(problems[:limit] if limit else problems)
    ]


def dataset_task(questions: Sequence[Question]) -> str:
    return questions[0].task if questions else "math"


def with_dataset_task(params: dict[str, Any], questions: Sequence[Question]) -> dict[str, Any]:
    """The job params for this dataset: `task` set from its questions (code for HumanEval);
    a different `task` in the given params, or an `entry_point` (it comes from each
    problem), is refused."""
    task = dataset_task(questions)
    given = params.get("task", task)
    if given != task:
        raise EvaluationError(
            f"the dataset holds {task} questions, but the params ask for task {given!r}: "
            f"leave task out (it follows the dataset) or set it to {task!r}"
        )
    if "entry_point" in params:
        raise EvaluationError("entry_point comes from each problem: leave it out of the params")
    return {**params, "task": task} if task != "math" else dict(params)


def check_tasks(specs: Sequence[StrategySpec], questions: Sequence[Question]) -> None:
    """Every strategy's task must be the dataset's (a code answer is graded, a math one
    compared)."""
    task = dataset_task(questions)
    for spec in specs:
        if spec.params.get("task", "math") != task:
            raise EvaluationError(
                f"strategy {spec.label!r} runs task {spec.params.get('task', 'math')!r} on "
                f"{task} questions: build the specs with with_dataset_task(params, questions)"
            )


# --- strategies -----------------------------------------------------------------------


@dataclass(frozen=True)
class StrategySpec:
    """One column of the comparison: a strategy with its params, e.g. `tandem@economy`."""

    label: str
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)


def parse_strategies(text: str, base_params: dict[str, Any] | None = None) -> list[StrategySpec]:
    """Comma-separated strategies; `NAME@POINT` sets the operating point (cost_preference:
    quality | balanced | economy | a lambda) on top of `base_params`."""
    labels = [item.strip() for item in text.split(",") if item.strip()]
    if not labels:
        raise EvaluationError("give at least one strategy, e.g. tandem,llm_only,slm_only")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise EvaluationError(f"strategy listed twice: {', '.join(duplicates)}")
    return [_spec(label, dict(base_params or {})) for label in labels]


def _spec(label: str, params: dict[str, Any]) -> StrategySpec:
    name, _, point = label.partition("@")
    if point:
        params["cost_preference"] = _preference(point)
    data = {"question": _VALIDATION_QUESTION, "strategy": name, "params": params}
    try:
        request = parse_job_request(data, max_question_chars=len(_VALIDATION_QUESTION))
    except InvalidRequest as error:
        raise EvaluationError(f"strategy {label!r}: {error}") from None
    return StrategySpec(label, name, request.params.model_dump(mode="json", exclude_defaults=True))


def _preference(point: str) -> str | float:
    try:
        return float(point)
    except ValueError:
        if point in PRESETS:
            return point
    raise EvaluationError(
        f"operating point {point!r}: use {', '.join(PRESETS)} or a number (lambda), "
        "e.g. tandem@economy or tandem@0.5"
    )


# --- runners --------------------------------------------------------------------------


@dataclass
class JobRun:
    """What one job produced, in the shape of `JobResult.to_json()` / the API's job JSON."""

    job: dict[str, Any]
    latency_s: float
    job_id: str | None = None
    error: str | None = None


class Runner(Protocol):
    concurrency: int

    def run(self, spec: StrategySpec, question: Question) -> JobRun: ...

    def close(self) -> None: ...


class EmbeddedRunner:
    """Jobs in this process with `run_job`; concurrent calls share (and batch on) one engine."""

    def __init__(self, settings: Any, concurrency: int | None = None) -> None:
        from services.core.engines import Engines

        self.settings = settings
        self.engines = Engines(settings)
        self.concurrency = concurrency or settings.local_max_batch

    def check(self, specs: Sequence[StrategySpec]) -> None:
        """Fail before any work when a strategy is not available in this build."""
        from services.core.strategies import program_for

        for spec in specs:
            try:
                program_for(self._request(spec, _VALIDATION_QUESTION, {}))
            except ValueError as error:
                raise EvaluationError(f"strategy {spec.label!r}: {error}") from None

    def run(self, spec: StrategySpec, question: Question) -> JobRun:
        """One job; a model error on this question is the row's error (counted wrong), but
        one that stops every job (the model cannot load, the settings are wrong) is raised."""
        from services.core.backends.base import BackendError, ConfigurationError, ModelLoadError
        from services.core.runner import run_job

        request = self._request(spec, question.text, question.job_params)
        started = time.perf_counter()
        try:
            result = run_job(request, self.engines)
        except (ModelLoadError, ConfigurationError):
            raise
        except BackendError as error:
            return JobRun({}, time.perf_counter() - started, error=str(error) or repr(error))
        return JobRun(result.to_json(), time.perf_counter() - started)

    def close(self) -> None:
        self.engines.close()

    def _request(self, spec: StrategySpec, text: str, extra: dict[str, Any]):
        data = {"question": text, "strategy": spec.strategy, "params": spec.params | extra}
        return parse_job_request(data, max_question_chars=max(len(text), 1))


class ServiceRunner:
    """Jobs through a running service: POST /v1/jobs (idempotent per row), poll until done.
    The client retries transport errors and waits out 429 / 503 (see `services.client`)."""

    def __init__(
        self,
        base_url: str,
        key: str,
        concurrency: int = 32,
        timeout_s: float = 3600.0,
        run_tag: str = "",
    ) -> None:
        self.api = TandemClient(base_url, key, timeout=30.0)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.run_tag = run_tag

    def run(self, spec: StrategySpec, question: Question) -> JobRun:
        key = _idempotency_key(self.run_tag, spec, question)
        try:
            params = spec.params | question.job_params
            job = self.api.submit_job(question.text, spec.strategy, params, key)
        except APIError as error:
            raise EvaluationError(f"the service refused a job: {error}") from None
        try:
            job = self.api.wait_job(job["id"], self.timeout_s)
        except APIError as error:
            raise EvaluationError(f"reading job {job['id']} failed: {error}") from None
        except TimeoutError as error:
            raise EvaluationError(str(error)) from None
        timings = job.get("timings") or {}
        latency = timings.get("total_s")
        error = job.get("error") if job["status"] != "succeeded" else None
        if job["status"] == "cancelled":
            error = error or "cancelled"
        return JobRun(job, float(latency or 0.0), job_id=job["id"], error=error)

    def close(self) -> None:
        self.api.close()


def _idempotency_key(run_tag: str, spec: StrategySpec, question: Question) -> str:
    """The same row of the same run maps to the same job, so a resumed run reuses it."""
    material = json.dumps([run_tag, spec.strategy, spec.params, question.id, question.text])
    return "eval-" + hashlib.sha256(material.encode()).hexdigest()[:40]


# --- rows -----------------------------------------------------------------------------


def make_row(
    spec: StrategySpec, question: Question, run: JobRun, checker: AnswerChecker | None = None
) -> dict[str, Any]:
    """The result row of one job, its answer checked (graded in a sandbox for code)."""
    checked = (checker or AnswerChecker()).check(question, run.job, run.error)
    job = run.job
    cost = job.get("cost") or {}
    answer = job.get("answer")
    stages = job.get("stages") or []
    return {
        "strategy": spec.label,
        "base_strategy": spec.strategy,
        "params": spec.params,
        "question_id": question.id,
        "question_index": question.index,
        "level": question.level,
        "job_id": run.job_id,
        "task": question.task,
        "reference": question.reference,
        "answer": answer,
        **checked,
        "error": run.error,
        "cost": {name: cost.get(name, 0) for name in COST_FIELDS},
        "generated_by_role": dict(cost.get("generated_by_role") or {}),
        "generated_by_model": dict(cost.get("generated_by_model") or {}),
        "models": {stage["role"]: stage["model"] for stage in stages},
        "stages": [stage_summary(stage) for stage in stages],
        "outcome": job.get("summary") or {},
        "latency_s": round(run.latency_s, 4),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


COST_FIELDS = (
    "tflops",
    "prefill_tflops",
    "prompt_tokens",
    "cached_prompt_tokens",
    "generated_tokens",
    "latency_s",
)


def stage_summary(stage: dict[str, Any]) -> dict[str, Any]:
    output = stage.get("output") or {}
    summary = {
        "seq": stage["seq"],
        "kind": stage["kind"],
        "role": stage["role"],
        "generated_tokens": stage["generated_tokens"],
        "tflops": stage["tflops"],
        "latency_s": round(stage["latency_s"], 4),
        "note": stage.get("note", ""),
    }
    if "probability" in output:
        summary["probability"] = output["probability"]
        summary["threshold"] = output.get("threshold")
        summary["decision"] = "stop" if output.get("sufficient") else "continue"
    elif "finish_reason" in output:
        summary["finish_reason"] = output["finish_reason"]
    return summary


# --- the results file ------------------------------------------------------------------


class ResultsFile:
    """`results.jsonl`: one row per (strategy label, question id), appended as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Rows by key (a torn last line, from a run killed mid-write, is not one)."""
        try:
            return {(row["strategy"], row["question_id"]): row for _, row in jsonl.read(self.path)}
        except jsonl.BadLine as error:
            raise EvaluationError(f"{self.path}:{error.number}: not a result row") from None

    def append(self, row: dict[str, Any]) -> None:
        jsonl.append(self.path, row)

    def drop(self, keys: set[tuple[str, str]]) -> None:
        """Rewrite the file without the rows of `keys` (atomically: write, then rename)."""
        kept = [row for key, row in self.load().items() if key not in keys]
        scratch = self.path.with_suffix(".jsonl.tmp")
        scratch.write_bytes(b"".join(jsonl.encode(row) for row in kept))
        scratch.replace(self.path)


def check_resumable(
    done: dict[tuple[str, str], dict[str, Any]], specs: Iterable[StrategySpec]
) -> None:
    """Rows kept from an earlier run must come from the same strategy params."""
    wanted = {spec.label: spec.params for spec in specs}
    for (label, _qid), row in done.items():
        if label in wanted and row.get("params") != wanted[label]:
            raise EvaluationError(
                f"results for {label!r} were made with params {row.get('params')}, not "
                f"{wanted[label]}: choose another --out folder or delete the old results"
            )


# --- the run ----------------------------------------------------------------------------


@dataclass
class Evaluation:
    """What `run_evaluation` did: rows for the selection and the summary written."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    ran: int
    skipped: int


def run_evaluation(
    questions: Sequence[Question],
    specs: Sequence[StrategySpec],
    runner: Runner,
    out_dir: Path,
    *,
    dataset: str = "",
    baseline: str = "llm_only",
    progress: bool = True,
    retry_errors: bool = False,
    grader: Grader | None = None,
) -> Evaluation:
    """Run the missing (strategy, question) pairs, then write summary.json, table.md and
    pareto.png for the whole selection (rows from earlier runs included). With
    `retry_errors`, rows of the selection that ended in an error are run again. Code
    answers are graded by `grader` (default: one from the TANDEM_GRADER_* settings, built
    before any job runs, so a host that cannot sandbox fails first)."""
    from services.evaluation import report
    from services.evaluation.metrics import summarize

    check_tasks(specs, questions)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(out_dir / RESULTS_FILE)
    done = results.load()
    check_resumable(done, specs)
    if retry_errors:
        failed = {key for key, row in done.items() if row.get("error")}
        wanted = {(s.label, q.id) for s in specs for q in questions}
        if failed & wanted:
            results.drop(failed & wanted)
            done = results.load()
    pending = [(s, q) for q in questions for s in specs if (s.label, q.id) not in done]
    total = len(questions) * len(specs)
    checker = AnswerChecker(_grader(grader, questions, pending))
    _run_pending(pending, runner, checker, results, total - len(pending), total, progress)
    rows = selected_rows(results.load(), questions, specs)
    summary = summarize(
        rows,
        specs,
        baseline=baseline,
        dataset=dataset,
        n_questions=len(questions),
        task=dataset_task(questions),
    )
    report.write_report(out_dir, summary)
    return Evaluation(rows, summary, ran=len(pending), skipped=total - len(pending))


def _grader(
    grader: Grader | None,
    questions: Sequence[Question],
    pending: Sequence[tuple[StrategySpec, Question]],
) -> Grader | None:
    if grader is not None or not pending or dataset_task(questions) != "code":
        return grader
    from services.evaluation.checks import grader_from_settings
    from services.grading.sandbox import SandboxUnavailable

    try:
        return grader_from_settings()
    except SandboxUnavailable as error:
        raise EvaluationError(f"code answers cannot be graded here: {error}") from None


def _run_pending(
    pending: Sequence[tuple[StrategySpec, Question]],
    runner: Runner,
    checker: AnswerChecker,
    results: ResultsFile,
    initial: int,
    total: int,
    progress: bool,
) -> None:
    from tqdm import tqdm

    if not pending:
        return
    pool = ThreadPoolExecutor(max_workers=max(1, runner.concurrency), thread_name_prefix="eval")
    bar = tqdm(total=total, initial=initial, disable=not progress, unit="job", desc="eval")

    def run_and_check(spec: StrategySpec, question: Question) -> dict[str, Any]:
        return make_row(spec, question, runner.run(spec, question), checker)

    futures: list[Future[dict[str, Any]]] = [
        pool.submit(run_and_check, spec, question) for spec, question in pending
    ]
    try:
        for future in as_completed(futures):
            results.append(future.result())
            bar.update()
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)


def selected_rows(
    rows: dict[tuple[str, str], dict[str, Any]],
    questions: Sequence[Question],
    specs: Sequence[StrategySpec],
) -> list[dict[str, Any]]:
    """The rows of this selection, in (strategy, question) order."""
    return [
        rows[(spec.label, question.id)]
        for spec in specs
        for question in questions
        if (spec.label, question.id) in rows
    ]
