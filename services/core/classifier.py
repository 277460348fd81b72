"""The trained sufficiency classifier: training data, cost-aware thresholds, the artifact,
and the policy that serves it (tandem.md, "Classifier model, labels, thresholds").

Pipeline:
1. `collect`: for each question, one coordinator stream cut at every stage budget (greedy,
   generated in segments with `continuation`, exactly as the Tandem strategy does), the
   features of question + insights at every stage, and the executor's answer at every
   stage, checked against the gold answer. One JSON line per question, append-only.
2. `train`: StandardScaler + gradient-boosted trees on (features -> executor correct),
   questions whose label is the same at every stage dropped; per-stage thresholds
   grid-searched to maximise `accuracy - lambda * mean TFLOPs` for a set of lambdas.
3. The artifact: one zip holding a JSON manifest (schema, thresholds, provenance) and the
   fitted model (joblib). `load_policy` checks the manifest before unpickling anything.

No web or queue framework here: the CLI (`services.classifier_cli`) and the workers call in.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from services.core.answers import extract_answer, is_correct, reference_answer
from services.core.engines import ConfigurationError, Engines
from services.core.execution import SCORING_MAX_TOKENS, execute, execute_group
from services.core.params import JobParams
from services.core.prompts import classifier_text, coordinator_messages
from services.core.steps import Generate, StageRecord
from services.core.strategies.tandem import executor_step
from services.core.sufficiency import (
    FEATURE_NAMES,
    CostPreference,
    Verdict,
    features_from_scoring,
)
from services.settings import Settings

ARTIFACT_KIND = "tandem-sufficiency-classifier"
SCHEMA_VERSION = 1
SAMPLES_FORMAT = "tandem-classifier-samples"
SAMPLES_VERSION = 1
SAMPLES_FILE = "samples.jsonl"
META_FILE = "meta.json"
# The scoring text, rendered by `prompts.classifier_text` (Hint left out at stage 0).
TEXT_FORMAT = classifier_text("{question}", "{hint}")
THRESHOLD_STEP = 0.05
THRESHOLD_GRID: tuple[float, ...] = tuple(round(i * THRESHOLD_STEP, 2) for i in range(21))
# Lambdas are in accuracy per TFLOP. They are trained as fractions of the cost scale (the
# mean TFLOPs of the most expensive fixed stage on the training data): a fraction f means
# "giving up f of accuracy is worth saving the whole cost of the last stage".
LAMBDA_FRACTIONS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
PRESET_FRACTIONS: dict[str, float] = {"quality": 0.0, "balanced": 0.05, "economy": 0.2}
_EXHAUSTIVE_MAX_FREE_STAGES = 4  # 21^4 threshold tuples at most; beyond, coordinate ascent
_GBT = {"n_estimators": 100, "max_depth": 5, "learning_rate": 0.1}


class ClassifierArtifactError(ConfigurationError):
    """A classifier artifact is missing, corrupt or incompatible with this code."""


class CollectError(RuntimeError):
    """Training data cannot be collected as asked (the message says what to change)."""


class TrainingError(ValueError):
    """The collected data cannot train a classifier (too few usable questions)."""


def _artifact_error(path: Path | str, problem: str) -> ClassifierArtifactError:
    return ClassifierArtifactError(
        f"classifier artifact {path}: {problem}; retrain it with `tandem classifier train "
        f"--data DIR --out {path}`, or unset TANDEM_CLASSIFIER_ARTIFACT to use policy 'entropy'"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# =============================================================================== dataset


@dataclass(frozen=True)
class Item:
    """One dataset question with its gold answer."""

    qid: str
    index: int
    question: str
    reference: str


def read_dataset(path: Path) -> list[Item]:
    """A JSONL dataset (GSM8K or MATH-500 fields: `question`, `answer`). A question's id is
    its `id` / `unique_id` field, else a hash of its text (stable across reorderings)."""
    items: list[Item] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                question = str(record["question"])
                reference = reference_answer(record)
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CollectError(
                    f"{path} line {index + 1}: not a question record ({error})"
                ) from None
            qid = str(
                record.get("id")
                or record.get("unique_id")
                or "q-" + hashlib.sha256(question.encode()).hexdigest()[:16]
            )
            if qid not in seen:  # a repeated question would only repeat the same work
                seen.add(qid)
                items.append(Item(qid, index, question, reference))
    return items


# =============================================================================== collection


@dataclass(frozen=True)
class _Stream:
    """The coordinator stream as it stood at one stage."""

    insights: str
    tokens: int
    finished: bool
    tflops: float
    prefill_tflops: float
    latency_s: float


def collect_question(engines: Engines, item: Item, params: JobParams) -> dict[str, Any]:
    """Every stage of one question, embedded: one coordinator stream generated in budget
    increments, features and an executor answer at each stage reached."""
    streams = _coordinator_stream(engines, item.question, params)
    last = _last_reached(streams)
    hints = [s.insights for s in streams[: last + 1]]
    steps = [(i, executor_step(item.question, hint, params)) for i, hint in enumerate(hints)]
    answers = execute_group(steps, engines, params)
    scorings = [_score(engines, item.question, hint) for hint in hints]
    return _question_line(item, params, streams, scorings, answers)


def _coordinator_stream(engines: Engines, question: str, params: JobParams) -> list[_Stream]:
    """The same segments as `strategies.tandem`: continue the stream to each budget."""
    state = _Stream("", 0, False, 0.0, 0.0, 0.0)
    streams: list[_Stream] = []
    for stage, budget in enumerate(params.budgets):
        if budget > state.tokens and not state.finished:
            step = Generate(
                role="coordinator",
                kind="coordinator",
                messages=coordinator_messages(question),
                continuation=state.insights,
                max_tokens=budget - state.tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
            )
            record = execute(stage, step, engines, params)
            state = _Stream(
                state.insights + record.text,
                state.tokens + record.generated_tokens,
                record.finish_reason == "stop",
                state.tflops + record.tflops,
                state.prefill_tflops + record.prefill_tflops,
                state.latency_s + record.latency_s,
            )
        streams.append(state)
    return streams


def _last_reached(streams: Sequence[_Stream]) -> int:
    """The stage a Tandem run ends at without a classifier: the first where the coordinator
    had finished its insights, else the last."""
    return next((i for i, s in enumerate(streams) if s.finished), len(streams) - 1)


@dataclass(frozen=True)
class _Scored:
    scoring: Any  # backends.base.Scoring
    tflops: float


def _score(engines: Engines, question: str, hint: str) -> _Scored:
    from services.core.cost import prefill_tflops

    scoring = engines.backend("classifier").score(
        classifier_text(question, hint), SCORING_MAX_TOKENS
    )
    usage = scoring.usage
    n_params = engines.n_params("classifier")
    return _Scored(
        scoring, prefill_tflops(n_params, usage.prompt_tokens, usage.cached_prompt_tokens)
    )


def _question_line(
    item: Item,
    params: JobParams,
    streams: Sequence[_Stream],
    scorings: Sequence[_Scored],
    answers: Sequence[StageRecord],
) -> dict[str, Any]:
    stages = []
    for stage, budget in enumerate(params.budgets):
        src = min(stage, len(answers) - 1)  # stages after the coordinator finished: copies
        stages.append(
            _stage_entry(stage, budget, streams[src], scorings, src, answers[src], item.reference)
            | {"reached": stage == src}
        )
    return {
        "id": item.qid,
        "index": item.index,
        "question": item.question,
        "reference": item.reference,
        "insights": streams[-1].insights,
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
    reference: str,
) -> dict[str, Any]:
    scored = scorings[src]
    predicted = extract_answer(answer.text)
    prefill = (
        stream.prefill_tflops + answer.prefill_tflops + sum(s.tflops for s in scorings[: src + 1])
    )
    return {
        "stage": stage,
        "budget": budget,
        "coordinator_tokens": stream.tokens,
        "coordinator_finished": stream.finished,
        "hint_chars": len(stream.insights),
        "features": [round(x, 8) for x in features_from_scoring(scored.scoring, stage, budget)],
        "features_exact": bool(scored.scoring.exact),
        "answer": predicted,
        "correct": is_correct(predicted, reference),
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


# ------------------------------------------------------------------ through the services


class ServicesCollector:
    """Collect through a running deployment: one `fixed:B` job per budget over REST.

    Each fixed:B job regenerates the coordinator stream from scratch up to B tokens, so
    collecting this way costs about len(budgets)/2 times the embedded path's coordinator
    tokens (the recorded costs are the same: a Tandem run stopping at B pays B tokens).
    Features are computed here, by this process's feature model, over the job's insights
    (a fixed job consults no classifier). Jobs carry an Idempotency-Key, so a resumed
    collection picks up the jobs it already submitted instead of paying for them again.
    """

    def __init__(
        self,
        url: str,
        key: str,
        engines: Engines,
        poll_s: float = 1.0,
        timeout_s: float = 3600.0,
        transport: Any = None,
    ) -> None:
        import httpx

        self.engines = engines
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.client = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=60.0,
            transport=transport,
        )

    def close(self) -> None:
        self.client.close()

    def collect_question(self, item: Item, params: JobParams) -> dict[str, Any]:
        streams: list[_Stream] = []
        answers: list[StageRecord] = []
        for budget in params.budgets:
            if streams and streams[-1].finished:
                streams.append(streams[-1])
                continue
            job = self._run(item, params, budget)
            stream, answer = _fixed_job_stages(job)
            streams.append(stream)
            answers.append(answer)
        scorings = [
            _score(self.engines, item.question, s.insights) for s in streams[: len(answers)]
        ]
        return _question_line(item, params, streams, scorings, answers)

    def _run(self, item: Item, params: JobParams, budget: int) -> dict[str, Any]:
        body = {
            "question": item.question,
            "strategy": f"fixed:{budget}",
            "params": {
                "executor_max_tokens": params.executor_max_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "seed": params.seed,
            },
        }
        key = (
            f"tandem-collect:{item.qid}:{budget}:{params.executor_max_tokens}:{params.temperature}"
        )
        response = self.client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key[:200]})
        job = _json_or_raise(response)
        deadline = time.monotonic() + self.timeout_s
        while job.get("status") not in ("succeeded", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise CollectError(f"job {job.get('id')} not finished after {self.timeout_s:.0f} s")
            time.sleep(self.poll_s)
            job = _json_or_raise(self.client.get(f"/v1/jobs/{job['id']}"))
        if job["status"] != "succeeded":
            raise CollectError(
                f"job {job['id']} ({item.qid}, fixed:{budget}) {job['status']}: {job.get('error')}"
            )
        if "stages" not in job:
            job = _json_or_raise(self.client.get(f"/v1/jobs/{job['id']}"))
        return job


def _json_or_raise(response: Any) -> dict[str, Any]:
    if response.status_code >= 400:
        raise CollectError(
            f"{response.request.method} {response.request.url}: HTTP "
            f"{response.status_code}: {response.text[:300]}"
        )
    return response.json()


def _fixed_job_stages(job: dict[str, Any]) -> tuple[_Stream, StageRecord]:
    coordinator = [s for s in job["stages"] if s["kind"] == "coordinator"]
    executor = [s for s in job["stages"] if s["kind"] == "executor"]
    if len(executor) != 1:
        raise CollectError(f"job {job['id']} has {len(executor)} executor stages, expected 1")
    stream = _Stream(
        insights="".join(s["output"].get("text", "") for s in coordinator),
        tokens=sum(s["generated_tokens"] for s in coordinator),
        finished=bool(coordinator) and coordinator[-1]["output"].get("finish_reason") == "stop",
        tflops=sum(s["tflops"] for s in coordinator),
        prefill_tflops=sum(s["prefill_tflops"] for s in coordinator),
        latency_s=sum(s["latency_s"] for s in coordinator),
    )
    fields = StageRecord.__dataclass_fields__
    return stream, StageRecord(**{k: v for k, v in executor[0].items() if k in fields})


# ------------------------------------------------------------------ the resumable loop


@dataclass
class CollectSummary:
    done_before: int
    collected: int
    total: int
    path: Path


QuestionFn = Callable[[Item, JobParams], dict[str, Any]]


def collect(
    items: Sequence[Item],
    out_dir: Path,
    params: JobParams,
    collect_one: QuestionFn,
    meta: dict[str, Any],
    workers: int = 1,
    progress: bool = True,
) -> CollectSummary:
    """Collect every item not yet in `out_dir/samples.jsonl`, `workers` at a time.

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
    bar = _progress_bar(len(items), summary.done_before, progress)
    lock = threading.Lock()

    def one(item: Item) -> None:
        line = collect_one(item, params)
        with lock:
            append_line(path, line)
            summary.collected += 1
            bar.update(1)

    try:
        _run_bounded(one, todo, workers)
    finally:
        bar.close()
    return summary


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="q",
        desc="collect",
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.1,
    )


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


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with a single write, then fsync (no torn or lost lines)."""
    data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def collected_ids(path: Path) -> list[str]:
    """Ids already in a samples file, after cutting off a torn last line."""
    if not path.exists():
        return []
    _repair_tail(path)
    return [line["id"] for line in _read_lines(path)]


def _repair_tail(path: Path) -> None:
    with path.open("rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise CollectError(f"{path} line {number} is not JSON: {error}") from None


_META_MUST_MATCH = ("format", "version", "budgets", "executor_max_tokens", "temperature", "top_p")


def _check_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    meta = {"format": SAMPLES_FORMAT, "version": SAMPLES_VERSION} | meta
    path = out_dir / META_FILE
    if path.exists():
        old = json.loads(path.read_text())
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


def collect_meta(dataset: Path, params: JobParams, engines: Engines, mode: str) -> dict[str, Any]:
    return {
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
    roles = ("classifier",) if mode == "services" else ("coordinator", "executor", "classifier")
    models = {}
    for role in roles:
        backend = engines.backend(role)
        models["feature" if role == "classifier" else role] = {
            "name": backend.model_name,
            "n_params": engines.n_params(role),
        }
    return models


# =============================================================================== samples


@dataclass
class Samples:
    """Collected data as arrays: N questions x S stages."""

    ids: list[str]
    budgets: tuple[int, ...]
    features: np.ndarray  # (N, S, F)
    correct: np.ndarray  # (N, S) bool
    cost: np.ndarray  # (N, S) TFLOPs of stopping at each stage
    reached: np.ndarray  # (N, S) bool: False for stages after the coordinator finished
    exact: bool
    meta: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    @property
    def n(self) -> int:
        return len(self.ids)

    def kept(self) -> np.ndarray:
        """Questions whose label differs between reached stages (tandem.md: drop the rest)."""
        lo = np.where(self.reached, self.correct, True).all(axis=1)
        hi = np.where(self.reached, self.correct, False).any(axis=1)
        return ~lo & hi


def samples_path(data: Path) -> Path:
    return data / SAMPLES_FILE if data.is_dir() else data


def load_samples(data: Path) -> Samples:
    path = samples_path(data)
    if not path.is_file():
        raise TrainingError(
            f"no collected samples at {path}: run `tandem classifier collect` first"
        )
    lines = list(_read_lines(path))
    if not lines:
        raise TrainingError(f"{path} holds no questions yet")
    budgets = tuple(s["budget"] for s in lines[0]["stages"])
    for line in lines:
        if tuple(s["budget"] for s in line["stages"]) != budgets:
            raise TrainingError(
                f"{path}: question {line['id']} has budgets different from "
                f"{list(budgets)}; collect each budget set in its own directory"
            )
    meta_path = path.parent / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}

    def grid(key: str) -> np.ndarray:
        return np.array([[s[key] for s in line["stages"]] for line in lines])

    return Samples(
        ids=[line["id"] for line in lines],
        budgets=budgets,
        features=grid("features").astype(np.float64),
        correct=grid("correct").astype(bool),
        cost=grid("tflops").astype(np.float64),
        reached=grid("reached").astype(bool),
        exact=all(s["features_exact"] for line in lines for s in line["stages"]),
        meta=meta,
        source=path,
    )


# =============================================================================== cascade


@dataclass(frozen=True)
class CascadeResult:
    thresholds: tuple[float, ...]
    accuracy: float
    tflops: float
    stop_share: tuple[float, ...]  # share of questions stopping at each stage

    def objective(self, lam: float) -> float:
        return self.accuracy - lam * self.tflops


def stop_stages(probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """The stage each question stops at: the first whose probability reaches its threshold,
    else the last (whose own threshold is never looked at)."""
    n, s = probs.shape
    stop = np.full(n, s - 1)
    for stage in range(s - 2, -1, -1):
        stop = np.where(probs[:, stage] >= thresholds[stage], stage, stop)
    return stop


def simulate(
    probs: np.ndarray, correct: np.ndarray, cost: np.ndarray, thresholds: Sequence[float]
) -> CascadeResult:
    stop = stop_stages(probs, thresholds)
    rows = np.arange(len(stop))
    share = np.bincount(stop, minlength=probs.shape[1]) / max(1, len(stop))
    return CascadeResult(
        thresholds=tuple(float(t) for t in thresholds),
        accuracy=float(correct[rows, stop].mean()) if len(stop) else 0.0,
        tflops=float(cost[rows, stop].mean()) if len(stop) else 0.0,
        stop_share=tuple(float(x) for x in share),
    )


def search_thresholds(
    probs: np.ndarray,
    correct: np.ndarray,
    cost: np.ndarray,
    lam: float,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> CascadeResult:
    """Per-stage thresholds maximising `accuracy - lam * mean cost` over the cascade.

    Exhaustive over the grid for up to 4 free stages (the last stage needs no threshold):
    thresholds that stop the same questions at a stage form one candidate, represented by
    the middle grid value of that run (the least committal choice for unseen questions).
    Ties in the objective go to the cheaper cascade, then to the first found. Beyond 4 free
    stages, coordinate ascent from the all-0.5 start (a local optimum).
    """
    n, s = probs.shape
    if s == 1 or n == 0:
        return simulate(probs, correct, cost, (0.0,) * s)
    free = s - 1
    if free <= _EXHAUSTIVE_MAX_FREE_STAGES:
        best = _exhaustive(probs, correct.astype(np.float64), cost, lam, tuple(grid))
    else:
        best = _coordinate_ascent(probs, correct, cost, lam, tuple(grid))
    return simulate(probs, correct, cost, (*best, 0.0))


def _candidates(p: np.ndarray, remaining: np.ndarray, grid: tuple[float, ...]) -> list[float]:
    """One threshold per distinct set of remaining questions it would stop."""
    counts = [int((remaining & (p >= t)).sum()) for t in grid]
    runs = [list(g) for _, g in itertools.groupby(range(len(grid)), key=lambda i: counts[i])]
    return [grid[run[(len(run) - 1) // 2]] for run in runs]


def _exhaustive(
    probs: np.ndarray, correct: np.ndarray, cost: np.ndarray, lam: float, grid: tuple[float, ...]
) -> tuple[float, ...]:
    n, s = probs.shape
    best: list[Any] = [-math.inf, math.inf, ()]  # objective, total cost, thresholds

    def visit(stage: int, remaining: np.ndarray, acc: float, spent: float, chosen: tuple) -> None:
        if stage == s - 1:
            acc += correct[remaining, stage].sum()
            spent += cost[remaining, stage].sum()
            value = (acc - lam * spent) / n
            if value > best[0] + 1e-12 or (
                abs(value - best[0]) <= 1e-12 and spent < best[1] - 1e-12
            ):
                best[:] = [value, spent, chosen]
            return
        p = probs[:, stage]
        for t in _candidates(p, remaining, grid):
            stop = remaining & (p >= t)
            visit(
                stage + 1,
                remaining & ~stop,
                acc + correct[stop, stage].sum(),
                spent + cost[stop, stage].sum(),
                (*chosen, t),
            )

    visit(0, np.ones(n, dtype=bool), 0.0, 0.0, ())
    return best[2]


def _coordinate_ascent(
    probs: np.ndarray, correct: np.ndarray, cost: np.ndarray, lam: float, grid: tuple[float, ...]
) -> tuple[float, ...]:
    s = probs.shape[1]
    current = [0.5] * (s - 1)

    def score(ts: Sequence[float]) -> tuple[float, float]:
        result = simulate(probs, correct, cost, (*ts, 0.0))
        return (result.objective(lam), -result.tflops)

    best = score(current)
    for _ in range(20):
        improved = False
        for stage in range(s - 1):
            for t in grid:
                trial = [*current[:stage], t, *current[stage + 1 :]]
                value = score(trial)
                if value > best:
                    best, current, improved = value, trial, True
        if not improved:
            break
    return tuple(current)


def oracle(correct: np.ndarray, cost: np.ndarray) -> CascadeResult:
    """Stop at the first stage whose answer is correct (stage 0 when none is)."""
    first = np.where(correct.any(axis=1), correct.argmax(axis=1), 0)
    rows = np.arange(len(first))
    share = np.bincount(first, minlength=correct.shape[1]) / max(1, len(first))
    return CascadeResult(
        thresholds=(),
        accuracy=float(correct[rows, first].mean()),
        tflops=float(cost[rows, first].mean()),
        stop_share=tuple(float(x) for x in share),
    )


# =============================================================================== training


def new_model(seed: int = 0) -> Any:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("gbt", GradientBoostingClassifier(random_state=seed, **_GBT)),
        ]
    )


@dataclass
class OperatingPoint:
    lam: float
    fraction: float
    thresholds: tuple[float, ...]
    accuracy: float
    tflops: float
    stop_share: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "lambda": self.lam,
            "fraction": self.fraction,
            "thresholds": list(self.thresholds),
            "accuracy": self.accuracy,
            "tflops": self.tflops,
            "stop_share": list(self.stop_share),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OperatingPoint:
        return cls(
            lam=float(data["lambda"]),
            fraction=float(data.get("fraction", math.nan)),
            thresholds=tuple(float(t) for t in data["thresholds"]),
            accuracy=float(data.get("accuracy", math.nan)),
            tflops=float(data.get("tflops", math.nan)),
            stop_share=tuple(data.get("stop_share", ())),
        )


@dataclass
class TrainResult:
    model: Any
    points: list[OperatingPoint]
    presets: dict[str, float]
    cost_scale: float
    report: dict[str, Any]


def _rows(samples: Samples, questions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training rows of the given questions: every reached stage."""
    mask = samples.reached[questions]
    x = samples.features[questions][mask]
    y = samples.correct[questions][mask].astype(int)
    groups = np.repeat(questions, mask.sum(axis=1))
    return x, y, groups


def train(samples: Samples, folds: int = 5, seed: int = 0) -> TrainResult:
    """Fit the classifier, cross-validate it, and search thresholds per lambda.

    Thresholds are searched on out-of-fold probabilities (each kept question scored by a
    model that did not see it; dropped questions, which no model trains on, by the final
    model), so they are tuned for questions the classifier has not seen rather than for
    its own, over-confident, training fit.
    """
    _check_features(samples)
    kept = np.flatnonzero(samples.kept())
    if len(kept) < 2:
        raise TrainingError(
            f"only {len(kept)} of {samples.n} questions have an executor answer that is right "
            "at some stages and wrong at others; collect more questions (or easier ones, or "
            "a longer --executor-max-tokens) so that at least 2 do"
        )
    x, y, _ = _rows(samples, kept)
    model = new_model(seed).fit(x, y)
    probs = _probabilities(model, samples.features)
    oof, cv = _cross_validate(samples, kept, min(folds, len(kept)), seed)
    probs[kept] = oof
    cost_scale = float(samples.cost[:, -1].mean()) or 1.0
    points = operating_points(probs, samples.correct, samples.cost, cost_scale)
    presets = {name: f / cost_scale for name, f in PRESET_FRACTIONS.items()}
    report = cascade_report(samples, probs, points, presets)
    report["classifier"] = cv | {
        "questions": samples.n,
        "questions_kept": len(kept),
        "rows": len(y),
        "positive_rate": float(y.mean()),
    }
    return TrainResult(model, points, presets, cost_scale, report)


def _check_features(samples: Samples) -> None:
    if samples.features.shape[-1] != len(FEATURE_NAMES):
        raise TrainingError(
            f"samples have {samples.features.shape[-1]} features, this code {len(FEATURE_NAMES)}: "
            "collect again with this version"
        )


def _probabilities(model: Any, features: np.ndarray) -> np.ndarray:
    """P(executor correct) for an (N, S, F) feature array, as (N, S)."""
    n, s, f = features.shape
    return model.predict_proba(features.reshape(n * s, f))[:, 1].reshape(n, s)


def _cross_validate(
    samples: Samples, kept: np.ndarray, folds: int, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Out-of-fold probabilities of the kept questions (GroupKFold by question), and the
    classifier's accuracy (at 0.5) and AUC over their reached stages."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    oof = np.zeros((len(kept), samples.features.shape[1]))
    for train_idx, test_idx in GroupKFold(n_splits=folds).split(kept, groups=kept):
        x, y, _ = _rows(samples, kept[train_idx])
        model = new_model(seed).fit(x, y)
        oof[test_idx] = _probabilities(model, samples.features[kept[test_idx]])
    mask = samples.reached[kept]
    truth = samples.correct[kept][mask]
    predicted = oof[mask]
    auc = float(roc_auc_score(truth, predicted)) if 0 < truth.sum() < truth.size else None
    return oof, {
        "evaluated_on": f"{folds}-fold GroupKFold by question, out-of-fold",
        "accuracy": float(((predicted >= 0.5) == truth).mean()),
        "auc": auc,
    }


def operating_points(
    probs: np.ndarray, correct: np.ndarray, cost: np.ndarray, cost_scale: float
) -> list[OperatingPoint]:
    points = []
    for fraction in LAMBDA_FRACTIONS:
        lam = fraction / cost_scale
        result = search_thresholds(probs, correct, cost, lam)
        points.append(
            OperatingPoint(
                lam, fraction, result.thresholds, result.accuracy, result.tflops, result.stop_share
            )
        )
    return points


def cascade_report(
    samples: Samples,
    probs: np.ndarray,
    points: Sequence[OperatingPoint],
    presets: dict[str, float],
) -> dict[str, Any]:
    """The cascade at each operating point beside every fixed stage and the oracle."""
    rows: list[dict[str, Any]] = []
    for stage, budget in enumerate(samples.budgets):
        rows.append(
            _row(
                f"fixed stage {stage} ({budget} tok)",
                samples.correct[:, stage].mean(),
                samples.cost[:, stage].mean(),
                None,
            )
        )
    best = oracle(samples.correct, samples.cost)
    rows.append(_row("oracle (first correct stage)", best.accuracy, best.tflops, best.stop_share))
    names = {round(v, 15): k for k, v in presets.items()}
    for point in points:
        result = simulate(probs, samples.correct, samples.cost, point.thresholds)
        label = f"cascade lambda={point.lam:.4g} (f={point.fraction:g})"
        if round(point.lam, 15) in names:
            label += f" [{names[round(point.lam, 15)]}]"
        rows.append(
            _row(label, result.accuracy, result.tflops, result.stop_share)
            | {"thresholds": list(point.thresholds), "lambda": point.lam}
        )
    return {"questions": samples.n, "budgets": list(samples.budgets), "rows": rows}


def _row(
    name: str, accuracy: float, tflops: float, share: Sequence[float] | None
) -> dict[str, Any]:
    row = {"policy": name, "accuracy": float(accuracy), "tflops": float(tflops)}
    if share is not None:
        row["stop_share"] = [round(float(x), 4) for x in share]
    return row


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    lines = []
    clf = report.get("classifier")
    if clf:
        auc = "n/a" if clf.get("auc") is None else f"{clf['auc']:.3f}"
        lines.append(
            f"classifier: {clf['questions_kept']}/{clf['questions']} questions kept, "
            f"{clf['rows']} rows, positive rate {clf['positive_rate']:.3f}, "
            f"accuracy at 0.5 {clf['accuracy']:.3f}, AUC {auc} ({clf['evaluated_on']})"
        )
    lines.append(f"{report['questions']} questions, budgets {report['budgets']}")
    width = max(len(r["policy"]) for r in report["rows"])
    lines.append(f"{'policy':<{width}}  accuracy   TFLOPs/q   stop share per stage  thresholds")
    for r in report["rows"]:
        share = " ".join(f"{x:.2f}" for x in r.get("stop_share", [])) or "-"
        thresholds = " ".join(f"{t:.2f}" for t in r.get("thresholds", [])) or "-"
        lines.append(
            f"{r['policy']:<{width}}  {r['accuracy']:8.3f}  {r['tflops']:9.4f}   "
            f"{share:<20}  {thresholds}"
        )
    return "\n".join(lines)


def evaluate(artifact: Artifact, samples: Samples) -> dict[str, Any]:
    """The trained cascade on data it was not trained on (a transfer check)."""
    from sklearn.metrics import roc_auc_score

    _check_features(samples)
    probs = _probabilities(artifact.model, samples.features)
    points = [_fit_thresholds(p, len(samples.budgets)) for p in artifact.points]
    report = cascade_report(samples, probs, points, artifact.presets)
    truth, predicted = samples.correct[samples.reached], probs[samples.reached]
    report["classifier"] = {
        "questions": samples.n,
        "questions_kept": int(samples.kept().sum()),
        "rows": int(truth.size),
        "positive_rate": float(truth.mean()),
        "evaluated_on": "data the classifier was not trained on (all reached stages)",
        "accuracy": float(((predicted >= 0.5) == truth).mean()),
        "auc": float(roc_auc_score(truth, predicted)) if 0 < truth.sum() < truth.size else None,
    }
    if tuple(samples.budgets) != tuple(artifact.budgets):
        report["warning"] = (
            f"data budgets {list(samples.budgets)} differ from the artifact's "
            f"{list(artifact.budgets)}: thresholds applied by stage index"
        )
    return report


def _fit_thresholds(point: OperatingPoint, n_stages: int) -> OperatingPoint:
    """Thresholds by stage index for a cascade of n_stages (missing stages: always stop)."""
    ts = [*point.thresholds[: n_stages - 1], *([0.0] * n_stages)][:n_stages]
    return OperatingPoint(
        point.lam, point.fraction, tuple(ts), point.accuracy, point.tflops, point.stop_share
    )


# =============================================================================== artifact


@dataclass
class Artifact:
    model: Any
    manifest: dict[str, Any]
    path: Path | None = None

    @property
    def points(self) -> list[OperatingPoint]:
        return [OperatingPoint.from_dict(p) for p in self.manifest["operating_points"]]

    @property
    def presets(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.manifest["presets"].items()}

    @property
    def budgets(self) -> tuple[int, ...]:
        return tuple(self.manifest["budgets"])


def build_manifest(result: TrainResult, samples: Samples, seed: int) -> dict[str, Any]:
    import sklearn

    meta = samples.meta
    return {
        "kind": ARTIFACT_KIND,
        "schema_version": SCHEMA_VERSION,
        "features": {
            "names": list(FEATURE_NAMES),
            "count": len(FEATURE_NAMES),
            "text_format": TEXT_FORMAT,
            "max_tokens": SCORING_MAX_TOKENS,
            "feature_model": meta.get("models", {}).get("feature", {}).get("name"),
            "exact": samples.exact,
        },
        "model": {"type": "StandardScaler+GradientBoostingClassifier", **_GBT, "seed": seed},
        "budgets": list(samples.budgets),
        "cost_scale_tflops": result.cost_scale,
        "lambda_unit": "accuracy per TFLOP (paper metric: generated tokens only)",
        "presets": result.presets,
        "preset_fractions": PRESET_FRACTIONS,
        "operating_points": [p.to_dict() for p in result.points],
        "threshold_step": THRESHOLD_STEP,
        "report": result.report,
        "provenance": {
            "data": str(samples.source.resolve()) if samples.source else None,
            "data_sha256": sha256_file(samples.source) if samples.source else None,
            "dataset": meta.get("dataset"),
            "dataset_sha256": meta.get("dataset_sha256"),
            "models": meta.get("models"),
            "executor_max_tokens": meta.get("executor_max_tokens"),
            "questions": samples.n,
            "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "sklearn_version": sklearn.__version__,
            "numpy_version": np.__version__,
        },
    }


def save_artifact(path: Path, model: Any, manifest: dict[str, Any]) -> None:
    """One zip: manifest.json (readable without unpickling) + model.joblib; written to a
    temporary file and renamed, so a reader never sees half an artifact."""
    import joblib

    buffer = io.BytesIO()
    joblib.dump(model, buffer)
    blob = buffer.getvalue()
    manifest = manifest | {"model_sha256": hashlib.sha256(blob).hexdigest()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest, indent=2, default=_json_default))
        archive.writestr("model.joblib", blob)
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def read_manifest(path: Path) -> dict[str, Any]:
    """The artifact's manifest, checked against this code's feature schema."""
    if not path.is_file():
        raise _artifact_error(path, "no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read("manifest.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise _artifact_error(path, f"not a readable classifier artifact ({e})") from None
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    if not isinstance(manifest, dict) or manifest.get("kind") != ARTIFACT_KIND:
        raise _artifact_error(path, f"not a {ARTIFACT_KIND} artifact")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise _artifact_error(path, f"schema version {version}, this code reads {SCHEMA_VERSION}")
    features = manifest.get("features") or {}
    if features.get("names") != list(FEATURE_NAMES) or features.get("count") != len(FEATURE_NAMES):
        raise _artifact_error(path, "its feature names differ from this code's FEATURE_NAMES")
    if (
        features.get("text_format") != TEXT_FORMAT
        or features.get("max_tokens") != SCORING_MAX_TOKENS
    ):
        raise _artifact_error(
            path, "its scoring text format or truncation differs from this code's"
        )
    points = manifest.get("operating_points") or []
    n_stages = len(manifest.get("budgets") or [])
    if not points or any(len(p.get("thresholds", ())) != n_stages for p in points):
        raise _artifact_error(path, "its operating points are missing or malformed")


def load_artifact(path: Path) -> Artifact:
    import joblib

    manifest = read_manifest(path)
    try:
        with zipfile.ZipFile(path) as archive:
            blob = archive.read("model.joblib")
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise _artifact_error(path, f"its model cannot be read ({error})") from None
    if hashlib.sha256(blob).hexdigest() != manifest.get("model_sha256"):
        raise _artifact_error(path, "its model does not match the manifest's checksum (corrupt)")
    try:
        model = joblib.load(io.BytesIO(blob))
    except Exception as error:  # unpickling fails in many ways: all mean "cannot use it"
        trained = manifest.get("provenance", {}).get("sklearn_version")
        raise _artifact_error(
            path,
            f"its model cannot be loaded ({type(error).__name__}: {error}; trained with "
            f"scikit-learn {trained})",
        ) from None
    if getattr(model, "n_features_in_", None) != len(FEATURE_NAMES):
        raise _artifact_error(
            path,
            f"its model takes {getattr(model, 'n_features_in_', '?')} "
            f"features, not {len(FEATURE_NAMES)}",
        )
    return Artifact(model, manifest, path)


# =============================================================================== policy


class TrainedPolicy:
    """`SufficiencyPolicy` over a trained artifact.

    The operating point: a preset name uses the artifact's own lambda for it (fractions of
    the training cost scale, see PRESET_FRACTIONS); a numeric lambda (accuracy per TFLOP)
    uses the thresholds of the nearest trained lambda on a log scale (0 is its own point;
    a lambda below half the smallest positive one trained counts as 0). Thresholds are
    per stage index; a stage beyond the trained ones always stops.
    """

    name = "trained"

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        self.model = artifact.model
        self.points = sorted(artifact.points, key=lambda p: p.lam)
        self.presets = artifact.presets

    def point_for(self, preference: CostPreference) -> OperatingPoint:
        if isinstance(preference, str):
            if preference not in self.presets:
                raise ConfigurationError(
                    f"unknown cost preference {preference!r}: use one of "
                    f"{', '.join(self.presets)} or a number (lambda per TFLOP)"
                )
            lam = self.presets[preference]
        else:
            lam = float(preference)
        return min(self.points, key=lambda p: _lambda_distance(lam, p.lam, self.points))

    def probability(self, features: Sequence[float]) -> float:
        if len(features) != len(FEATURE_NAMES):
            raise ConfigurationError(
                f"the trained classifier takes {len(FEATURE_NAMES)} features, got {len(features)}"
            )
        row = np.asarray(features, dtype=np.float64).reshape(1, -1)
        return float(self.model.predict_proba(row)[0, 1])

    def judge(
        self, features: Sequence[float], stage_index: int, preference: CostPreference
    ) -> Verdict:
        probability = self.probability(features)
        thresholds = self.point_for(preference).thresholds
        last = len(thresholds) - 1
        threshold = thresholds[stage_index] if stage_index < last else 0.0
        return Verdict(probability, threshold, probability >= threshold, self.name)


def _lambda_distance(lam: float, trained: float, points: Sequence[OperatingPoint]) -> float:
    smallest = min((p.lam for p in points if p.lam > 0), default=1.0)
    floor = smallest / 2
    a, b = max(lam, 0.0), trained
    if a < floor or b <= 0:
        return 0.0 if (a < floor) == (b <= 0) else math.inf
    return abs(math.log(a / b))


def load_policy(path: Path) -> TrainedPolicy:
    """The trained policy from an artifact, or a ClassifierArtifactError naming the path
    and the fix."""
    return TrainedPolicy(load_artifact(Path(path)))


def check_classifier_artifact(settings: Settings) -> Artifact | None:
    """Validate the configured artifact (None when none is configured: policy 'entropy').

    Meant for the classifier worker's start, so that a bad artifact stops it at once with
    the one-line message instead of failing every job later."""
    if not settings.classifier_artifact:
        return None
    return load_artifact(Path(settings.classifier_artifact))


def train_artifact(data: Path, out: Path, folds: int = 5, seed: int = 0) -> tuple[Artifact, dict]:
    """Train on collected data and write the artifact and its report (`<out>.report.json`)."""
    samples = load_samples(data)
    result = train(samples, folds=folds, seed=seed)
    manifest = build_manifest(result, samples, seed)
    save_artifact(out, result.model, manifest)
    write_report(report_path(out), result.report)
    return load_artifact(out), result.report


def report_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".report.json")


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
