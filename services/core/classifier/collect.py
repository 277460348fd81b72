"""Collecting training data: for each question, every stage of a Tandem run (the
coordinator stream cut at each budget, the features of question + insights, the executor's
answer checked against the gold answer), one JSON line per question, resumably.

Embedded (`collect_question`), the coordinator stream is grown segment by segment with the
Tandem strategy's own `CoordinatorStream`, so the stages are exactly a Tandem run's. Through
a running deployment (`line_from_fixed_jobs`), each stage is a `fixed:B` job's record, run
by a caller-supplied function (the HTTP side is `services.collect_remote`). Either way
the features are computed here, by this process's feature model.

`collect` runs the questions not yet in `samples.jsonl`, a few at a time, and appends
each line durably (`services.core.jsonl`). No progress bar or HTTP here: callers pass callbacks.

Labels: a math stage is correct when the executor's extracted answer equals the gold answer
(`answers.is_correct`). A code item (a HumanEval line: `task_id`, `prompt`, `entry_point`,
`test`) runs as a `task: code` job would (code prompts, the function extracted with
`tasks.job_task`), and its stages are labelled by the caller's `grade` function, which runs
the function against the problem's tests in the sandbox (`services.grading`; the CLI passes
one): correct = `passed`. Nothing here runs model code itself.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import reduce
from pathlib import Path
from typing import Any

from services.core import jsonl
from services.core.answers import extract_answer, is_correct, reference_answer
from services.core.backends.base import Scoring
from services.core.classifier.samples import (
    META_FILE,
    SAMPLES_FILE,
    SAMPLES_FORMAT,
    SAMPLES_VERSION,
    TEXT_FORMAT,
    sha256_file,
)
from services.core.cost import prefill_tflops
from services.core.engines import Engines
from services.core.execution import execute, execute_group
from services.core.params import JobParams
from services.core.prompts import classifier_text
from services.core.steps import StageRecord
from services.core.strategies.tandem import CoordinatorStream, executor_step
from services.core.sufficiency import SCORING_MAX_TOKENS, features_from_scoring
from services.core.tasks import job_task


class CollectError(RuntimeError):
    """Training data cannot be collected as asked (the message says what to change)."""


# --------------------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class Item:
    """One dataset question with its gold answer (math), or one code problem (its tests,
    in `problem`, decide)."""

    qid: str
    index: int
    question: str
    reference: str | None
    task: str = "math"
    problem: dict[str, str] | None = None  # code: task_id, prompt, entry_point, test

    @property
    def job_params(self) -> dict[str, Any]:
        """The job params this item's stages run with beyond the collection's own."""
        if self.task != "code" or self.problem is None:
            return {}
        return {"task": "code", "entry_point": self.problem["entry_point"]}


HUMANEVAL_FIELDS = ("task_id", "prompt", "entry_point", "test")


def read_dataset(path: Path) -> list[Item]:
    """A JSONL dataset: GSM8K or MATH-500 fields (`question`, `answer`), or HumanEval's
    (`task_id`, `prompt`, `entry_point`, `test`: code items, id = task_id). A question's id
    is its `id` / `unique_id` field, else a hash of its text (stable across reorderings).
    The first line decides the kind; a file mixing the two is refused."""
    items: list[Item] = []
    seen: set[str] = set()
    code: bool | None = None
    with path.open(encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if code is None:
                    code = isinstance(record, dict) and all(k in record for k in HUMANEVAL_FIELDS)
                item = _code_item(record, index) if code else _math_item(record, index)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                kind = "HumanEval problem" if code else "question record"
                raise CollectError(f"{path} line {index + 1}: not a {kind} ({error})") from None
            if item.qid not in seen:  # a repeated question would only repeat the same work
                seen.add(item.qid)
                items.append(item)
    return items


def _math_item(record: dict[str, Any], index: int) -> Item:
    question = str(record["question"])
    reference = reference_answer(record)
    qid = str(
        record.get("id")
        or record.get("unique_id")
        or "q-" + hashlib.sha256(question.encode()).hexdigest()[:16]
    )
    return Item(qid, index, question, reference)


def _code_item(record: dict[str, Any], index: int) -> Item:
    problem = {name: record[name] for name in HUMANEVAL_FIELDS}
    if not all(isinstance(value, str) for value in problem.values()):
        raise TypeError(f"{', '.join(HUMANEVAL_FIELDS)} must be strings")
    if not problem["entry_point"].isidentifier():
        raise ValueError(f"entry_point {problem['entry_point']!r} is not a Python identifier")
    return Item(problem["task_id"], index, problem["prompt"], None, "code", problem)


def dataset_task(items: Sequence[Item]) -> str:
    return items[0].task if items else "math"


def item_params(item: Item, params: JobParams) -> JobParams:
    """The collection's params with the item's own (a code item's task and entry point)."""
    extra = item.job_params
    return JobParams.model_validate(params.model_dump() | extra) if extra else params


# A code stage's label: grade(item, candidate) -> (passed, extra fields for the stage), run
# in a sandbox by the caller (the CLI: services.grading).
Grade = Callable[[Item, str], tuple[bool, dict[str, Any]]]


def label(item: Item, params: JobParams, text: str, grade: Grade | None) -> dict[str, Any]:
    """`answer` and `correct` of one executor reply (code: plus the grader's fields)."""
    if item.task != "code":
        predicted = extract_answer(text)
        return {"answer": predicted, "correct": is_correct(predicted, item.reference or "")}
    if grade is None:
        raise CollectError(
            f"{item.qid} is a code problem: its stages are labelled by the sandboxed grader, "
            "and none was given"
        )
    answer = job_task(item.question, params).answer(text)
    passed, extra = grade(item, answer.value or text)
    return {"answer": answer.value, "correct": passed, "extraction": answer.note, **extra}


# --------------------------------------------------------------------------- one question


@dataclass(frozen=True)
class _Stream:
    """The coordinator stream as it stood at one stage, with what its segments cost."""

    stream: CoordinatorStream = field(default_factory=CoordinatorStream)
    tflops: float = 0.0
    prefill_tflops: float = 0.0
    latency_s: float = 0.0

    def extended(self, record: StageRecord) -> _Stream:
        return _Stream(
            self.stream.extended(record),
            self.tflops + record.tflops,
            self.prefill_tflops + record.prefill_tflops,
            self.latency_s + record.latency_s,
        )


def collect_question(
    engines: Engines, item: Item, params: JobParams, grade: Grade | None = None
) -> dict[str, Any]:
    """Every stage of one question, embedded: one coordinator stream generated in budget
    increments, features and an executor answer at each stage reached (a code item's
    answers labelled by `grade`)."""
    params = item_params(item, params)
    streams = _coordinator_stream(engines, item.question, params)
    last = _last_reached(streams)
    hints = [s.stream.text for s in streams[: last + 1]]
    steps = [(i, executor_step(item.question, hint, params)) for i, hint in enumerate(hints)]
    answers = execute_group(steps, engines, params)
    return _question_line(engines, item, params, streams, answers, grade)


def _coordinator_stream(engines: Engines, question: str, params: JobParams) -> list[_Stream]:
    """The stream at each stage, cut exactly as `strategies.tandem` cuts it."""
    state = _Stream()
    streams: list[_Stream] = []
    for stage, budget in enumerate(params.budgets):
        segment = state.stream.continue_to(question, params, stage, budget)
        if segment is not None:
            state = state.extended(execute(stage, segment, engines, params))
        streams.append(state)
    return streams


def _last_reached(streams: Sequence[_Stream]) -> int:
    """The stage a Tandem run ends at without a classifier: the first where the coordinator
    had finished its insights, else the last."""
    return next((i for i, s in enumerate(streams) if s.stream.finished), len(streams) - 1)


FixedJob = Callable[[int], dict[str, Any]]


def line_from_fixed_jobs(
    engines: Engines,
    item: Item,
    params: JobParams,
    run_fixed: FixedJob,
    grade: Grade | None = None,
) -> dict[str, Any]:
    """Every stage of one question from `fixed:B` jobs: `run_fixed(B)` returns the finished
    job's JSON as the API shows it (run with `item.job_params` for a code item). Stages after
    the coordinator finished are not run (a Tandem run stops there too): they repeat the last
    one, as embedded."""
    params = item_params(item, params)
    streams: list[_Stream] = []
    answers: list[StageRecord] = []
    for budget in params.budgets:
        if streams and streams[-1].stream.finished:
            streams.append(streams[-1])
            continue
        stream, answer = _fixed_job_stages(run_fixed(budget))
        streams.append(stream)
        answers.append(answer)
    return _question_line(engines, item, params, streams, answers, grade)


def _fixed_job_stages(job: dict[str, Any]) -> tuple[_Stream, StageRecord]:
    """A fixed:B job's coordinator stream and executor answer, as stage records."""
    records = [_record(stage) for stage in job["stages"]]
    executor = [r for r in records if r.kind == "executor"]
    if len(executor) != 1:
        raise CollectError(f"job {job['id']} has {len(executor)} executor stages, expected 1")
    coordinator = [r for r in records if r.kind == "coordinator"]
    return reduce(_Stream.extended, coordinator, _Stream()), executor[0]


def _record(stage: dict[str, Any]) -> StageRecord:
    fields = StageRecord.__dataclass_fields__
    return StageRecord(**{k: v for k, v in stage.items() if k in fields})


@dataclass(frozen=True)
class _Scored:
    scoring: Scoring
    tflops: float


def _score(engines: Engines, question: str, hint: str) -> _Scored:
    scoring = engines.backend("classifier").score(
        classifier_text(question, hint), SCORING_MAX_TOKENS
    )
    usage = scoring.usage
    n_params = engines.n_params("classifier")
    return _Scored(
        scoring, prefill_tflops(n_params, usage.prompt_tokens, usage.cached_prompt_tokens)
    )


def _question_line(
    engines: Engines,
    item: Item,
    params: JobParams,
    streams: Sequence[_Stream],
    answers: Sequence[StageRecord],
    grade: Grade | None = None,
) -> dict[str, Any]:
    """The question's line: the stages reached (one per answer) scored by this process's
    feature model and labelled; stages after them copy the last (`reached: false`)."""
    scorings = [_score(engines, item.question, s.stream.text) for s in streams[: len(answers)]]
    labels = [label(item, params, answer.text, grade) for answer in answers]
    stages = []
    for stage, budget in enumerate(params.budgets):
        src = min(stage, len(answers) - 1)  # stages after the coordinator finished: copies
        stages.append(
            _stage_entry(stage, budget, streams[src], scorings, src, answers[src], labels[src])
            | {"reached": stage == src}
        )
    return {
        "id": item.qid,
        "index": item.index,
        "task": item.task,
        "question": item.question,
        "reference": item.reference,
        "insights": streams[-1].stream.text,
        "stages": stages,
        "collected_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _stage_entry(
    stage: int,
    budget: int,
    stream: _Stream,
    scorings: Sequence[_Scored],
    src: int,
    answer: StageRecord,
    labelled: dict[str, Any],
) -> dict[str, Any]:
    scored = scorings[src]
    prefill = (
        stream.prefill_tflops + answer.prefill_tflops + sum(s.tflops for s in scorings[: src + 1])
    )
    return {
        "stage": stage,
        "budget": budget,
        "coordinator_tokens": stream.stream.tokens,
        "coordinator_finished": stream.stream.finished,
        "hint_chars": len(stream.stream.text),
        "features": [round(x, 8) for x in features_from_scoring(scored.scoring, stage, budget)],
        "features_exact": bool(scored.scoring.exact),
        **labelled,
        "executor_tokens": answer.generated_tokens,
        "executor_finish": answer.finish_reason,
        "coordinator_tflops": stream.tflops,
        "executor_tflops": answer.tflops,
        # The paper's cost of stopping here: coordinator tokens to this budget plus the
        # executor's answer (generated tokens only).
        "tflops": stream.tflops + answer.tflops,
        # Beside it, the prompt work the paper leaves out (coordinator segments, executor
        # prompt, the classifier's scoring passes so far), for a fuller cost.
        "prefill_tflops": prefill,
    }


# --------------------------------------------------------------------------- the resumable loop


@dataclass
class CollectSummary:
    done_before: int
    collected: int
    total: int
    path: Path


QuestionFn = Callable[[Item, JobParams], dict[str, Any]]
Progress = Callable[[CollectSummary], None]


def collect(
    items: Sequence[Item],
    out_dir: Path,
    params: JobParams,
    collect_one: QuestionFn,
    meta: dict[str, Any],
    workers: int = 1,
    progress: Progress | None = None,
) -> CollectSummary:
    """Collect every item not yet in `out_dir/samples.jsonl`, `workers` at a time;
    `progress(summary)` is called once before the first question and after each one.

    Resumable: the file is append-only, each line is written whole with one write and
    fsync'd, a torn last line (a crash mid-write) is cut off on the next start, and ids
    already present are skipped. So an interruption loses at most the questions in flight,
    which the next run does; none is done twice.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_meta(out_dir, meta)
    path = out_dir / SAMPLES_FILE
    done = set(collected_ids(path))
    todo = [item for item in items if item.qid not in done]
    summary = CollectSummary(len(items) - len(todo), 0, len(items), path)
    report = progress or (lambda _summary: None)
    report(summary)
    lock = threading.Lock()

    with jsonl.Appender(path) as samples:

        def one(item: Item) -> None:
            samples.append(collect_one(item, params))
            with lock:
                summary.collected += 1
                report(summary)

        _run_bounded(one, todo, workers)
    return summary


def _run_bounded(fn: Callable[[Item], None], items: Sequence[Item], workers: int) -> None:
    """Run fn over items with at most `workers` in flight; on the first failure stop
    submitting, let the running ones finish (their lines are kept), then raise."""
    if workers <= 1:
        for item in items:
            fn(item)
        return
    pending = iter(items)
    running: set[Future] = set()
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item in itertools.islice(pending, workers):
            running.add(pool.submit(fn, item))
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                if future.exception() is not None and failure is None:
                    failure = future.exception()
            if failure is None:
                for item in itertools.islice(pending, len(finished)):
                    running.add(pool.submit(fn, item))
    if failure is not None:
        raise failure


def collected_ids(path: Path) -> list[str]:
    """Ids already in a samples file (a torn last line is not one)."""
    try:
        return [line["id"] for _, line in jsonl.read(path)]
    except jsonl.BadLine as error:
        raise CollectError(str(error)) from None


_META_MUST_MATCH = (
    "format",
    "version",
    "task",
    "budgets",
    "executor_max_tokens",
    "temperature",
    "top_p",
)
_META_DEFAULTS = {"task": "math"}  # collections made before the field existed


def _check_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    meta = {"format": SAMPLES_FORMAT, "version": SAMPLES_VERSION} | _META_DEFAULTS | meta
    path = out_dir / META_FILE
    if path.exists():
        old = json.loads(path.read_text())
        old = _META_DEFAULTS | old
        changed = [k for k in _META_MUST_MATCH if old.get(k) != meta.get(k)]
        if changed:
            what = ", ".join(f"{k} {old.get(k)!r} (now {meta.get(k)!r})" for k in changed)
            raise CollectError(
                f"{out_dir} was collected with {what}: resume with the same "
                "options or collect into a new --out directory"
            )
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)


def collect_meta(
    dataset: Path, params: JobParams, engines: Engines, mode: str, task: str = "math"
) -> dict[str, Any]:
    return {
        "task": task,
        "budgets": list(params.budgets),
        "executor_max_tokens": params.executor_max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "dataset": str(dataset.resolve()),
        "dataset_sha256": sha256_file(dataset),
        "mode": mode,
        "models": _models(engines, mode),
        "text_format": TEXT_FORMAT,
        "scoring_max_tokens": SCORING_MAX_TOKENS,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _models(engines: Engines, mode: str) -> dict[str, Any]:
    """The models by role; the classifier's is stored as "feature" (the feature model, as
    the artifact's provenance has always called it)."""
    roles = ("classifier",) if mode == "services" else ("coordinator", "executor", "classifier")
    models = {}
    for role in roles:
        models["feature" if role == "classifier" else role] = {
            "name": engines.backend(role).model_name,
            "n_params": engines.n_params(role),
        }
    return models
