"""`tandem eval`: datasets, strategy specs, resumable results, and a summary and table that
can be recomputed from results.jsonl alone (with the real model, and with a scripted runner
whose answers are known)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest

from services.evaluation.harness import (
    EvaluationError,
    JobRun,
    Question,
    ResultsFile,
    StrategySpec,
    load_questions,
    parse_strategies,
    run_evaluation,
)
from services.evaluation.metrics import pareto_front, wilson_interval
from tests.code_problems import ENTRY_POINTS, PROBLEMS, write_problems

GSM8K_LINES = [
    {
        "question": "Sam has 2 apples and buys 3 more. How many apples does Sam have now?",
        "answer": "Sam has 2 + 3 = <<2+3=5>>5 apples.\n#### 5",
    },
    {
        "question": "A shop sells 1,200 pens a day. How many pens does it sell in 2 days?",
        "answer": "It sells 1,200 * 2 = 2,400 pens.\n#### 2,400",
    },
]
MATH_LINE = {
    "question": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
    "answer": "\\frac{3}{4}",
    "solution": "$\\frac12+\\frac14=\\boxed{\\frac{3}{4}}$",
    "level": "Level 1",
    "unique_id": "test/prealgebra/7.json",
}
TINY_PARAMS = {"budgets": [0, 4, 8], "executor_max_tokens": 8, "llm_max_tokens": 8}


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.jsonl"
    lines = [*GSM8K_LINES, MATH_LINE]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


# --- independent recomputation from results.jsonl ----------------------------------------


def read_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def wilson_by_quadratic(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson bounds as the roots of (p - k/n)^2 = z^2 p (1 - p) / n."""
    a = 1 + z * z / n
    b = -(2 * k / n + z * z / n)
    c = (k / n) ** 2
    root = math.sqrt(max(0.0, b * b - 4 * a * c))
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


def recompute(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(row["strategy"], []).append(row)
    expected = {}
    for label, group in by_label.items():
        n, k = len(group), sum(bool(r["correct"]) for r in group)
        low, high = wilson_by_quadratic(k, n)
        expected[label] = {
            "n": n,
            "accuracy": k / n,
            "ci_low": low,
            "ci_high": high,
            "mean_tflops": sum(sum(s["tflops"] for s in r["stages"]) for r in group) / n,
        }
    base = expected.get("llm_only")
    for values in expected.values():
        values["saving"] = 1 - values["mean_tflops"] / base["mean_tflops"] if base else None
    return expected


def table_cells(out: Path) -> dict[str, dict[str, str]]:
    lines = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return {
        cells[0]: dict(zip(header, cells, strict=True))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }


def percent(cell: str) -> float:
    return float(cell.rstrip("%")) / 100


def assert_summary_matches_rows(out: Path, labels: list[str]) -> None:
    rows = read_rows(out)
    keys = [(r["strategy"], r["question_id"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate (strategy, question) rows"
    expected = recompute(rows)
    summary = {e["label"]: e for e in json.loads((out / "summary.json").read_text())["strategies"]}
    table = table_cells(out)
    assert list(summary) == labels and list(table) == labels
    for label, want in expected.items():
        got = summary[label]
        assert got["n"] == want["n"]
        for name in ("accuracy", "ci_low", "ci_high", "mean_tflops"):
            assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12), (label, name)
        if want["saving"] is None:
            assert got["saving_vs_baseline"] is None
        else:
            assert got["saving_vs_baseline"] == pytest.approx(want["saving"], abs=1e-9)
        cells = table[label]
        metric = cells.get("accuracy [95% CI]") or cells["pass@1 [95% CI]"]  # code: pass@1
        accuracy, low, high = re.findall(r"[-\d.]+%", metric)
        for cell, value in ((accuracy, want["accuracy"]), (low, want["ci_low"]),
                            (high, want["ci_high"])):  # fmt: skip
            assert percent(cell) == pytest.approx(value, abs=0.0005 + 1e-9)
        assert float(cells["mean TFLOPs"]) == pytest.approx(want["mean_tflops"], rel=1e-3)
        if want["saving"] is not None:
            assert percent(cells["saving vs llm_only"]) == pytest.approx(want["saving"], abs=6e-4)
    for row in rows:  # each row's totals agree with its own stages
        assert row["cost"]["tflops"] == pytest.approx(sum(s["tflops"] for s in row["stages"]))
        by_role: dict[str, int] = {}
        for stage in row["stages"]:
            by_role[stage["role"]] = by_role.get(stage["role"], 0) + stage["generated_tokens"]
        assert {k: v for k, v in by_role.items() if v} == {
            k: v for k, v in row["generated_by_role"].items() if v
        }


# --- with the real default model --------------------------------------------------------


@pytest.mark.model
def test_eval_command_with_the_real_model_is_recomputable_and_resumable(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from services.cli import cli
    from services.settings import get_settings

    monkeypatch.setenv("TANDEM_LOCAL_THREADS", "1")  # spin-free on a shared, loaded machine
    monkeypatch.setenv("TANDEM_LOCAL_MAX_BATCH", "4")
    get_settings.cache_clear()
    out = tmp_path / "out"
    labels = ["tandem", "tandem@economy", "llm_only", "slm_only", "fixed:4"]
    argv = [
        "eval", "--dataset", str(dataset), "--strategies", ",".join(labels),
        "--params", json.dumps(TINY_PARAMS), "--out", str(out), "--no-progress",
    ]  # fmt: skip
    try:
        first = CliRunner().invoke(cli, argv, catch_exceptions=False)
        assert first.exit_code == 0, first.output
        assert "ran 15 job(s), kept 0" in first.output
        for name in ("results.jsonl", "summary.json", "table.md", "pareto.png"):
            assert (out / name).stat().st_size > 0, name
        assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert_summary_matches_rows(out, labels)
        rows = read_rows(out)
        assert {r["reference"] for r in rows} == {"5", "2400", "\\frac{3}{4}"}
        tandem = [r for r in rows if r["strategy"] == "tandem"]
        assert all(r["stages"][0]["kind"] == "classifier" for r in tandem)
        assert all(r["stages"][-1]["kind"] == "executor" for r in tandem)
        assert all(r["params"]["cost_preference"] == "economy"
                   for r in rows if r["strategy"] == "tandem@economy")  # fmt: skip

        again = CliRunner().invoke(cli, argv, catch_exceptions=False)
        assert again.exit_code == 0, again.output
        assert "ran 0 job(s), kept 15" in again.output
        assert read_rows(out) == rows  # no duplicates, nothing rewritten
    finally:
        get_settings.cache_clear()


# --- with a scripted runner (known answers, no model) ------------------------------------


class ScriptedRunner:
    """Answers from a script: (label, question index) -> answer; cost from the label."""

    concurrency = 3
    tokens: ClassVar[dict[str, tuple[int, int]]] = {
        "llm_only": (100, 0),
        "slm_only": (0, 80),
        "tandem": (30, 90),
        "fixed:50": (50, 85),
    }

    def __init__(self, answers: dict[tuple[str, int], str]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str]] = []

    def run(self, spec: StrategySpec, question: Question) -> JobRun:
        self.calls.append((spec.label, question.id))
        coordinator, executor = self.tokens[spec.strategy]
        stages = [
            self._stage(0, "coordinator", coordinator),
            self._stage(1, "executor", executor),
        ]
        cost = {
            "tflops": sum(s["tflops"] for s in stages),
            "prefill_tflops": 0.001,
            "generated_tokens": coordinator + executor,
            "generated_by_role": {"coordinator": coordinator, "executor": executor},
        }
        answer = self.answers.get((spec.label, question.index))
        job = {"answer": answer, "stages": stages, "cost": cost, "summary": {}}
        return JobRun(job, latency_s=1.0 + question.index)

    def close(self) -> None:
        pass

    @staticmethod
    def _stage(seq: int, role: str, tokens: int) -> dict[str, Any]:
        return {
            "seq": seq, "kind": role, "role": role, "model": "m", "generated_tokens": tokens,
            "tflops": 2 * 135e6 * tokens / 1e12, "latency_s": 0.5, "output": {},
        }  # fmt: skip


ANSWERS = {
    ("llm_only", 0): "5", ("llm_only", 1): "2400", ("llm_only", 2): "3/4",
    ("slm_only", 0): "5", ("slm_only", 1): "240",
    ("tandem", 0): "5", ("tandem", 1): "2,400", ("tandem", 2): "0.75",
    ("tandem@economy", 0): "5",
    ("fixed:50", 2): "\\frac{3}{4}",
}  # fmt: skip


def test_summary_table_and_resume_with_known_answers(dataset: Path, tmp_path: Path) -> None:
    questions = load_questions(dataset)
    specs = parse_strategies("tandem,tandem@economy,llm_only,slm_only,fixed:50")
    out = tmp_path / "out"
    runner = ScriptedRunner(ANSWERS)
    result = run_evaluation(questions, specs, runner, out, dataset="tiny", progress=False)
    assert result.ran == 15 and result.skipped == 0
    assert_summary_matches_rows(out, [s.label for s in specs])
    summary = {e["label"]: e for e in result.summary["strategies"]}
    assert [summary[label]["correct"] for label in summary] == [3, 1, 3, 1, 1]
    assert summary["tandem"]["saving_vs_baseline"] == pytest.approx(1 - 120 / 100)
    assert summary["slm_only"]["saving_vs_baseline"] == pytest.approx(0.2)
    assert summary["tandem"]["coordinator_share"] == pytest.approx(30 / 120)
    assert summary["llm_only"]["latency_p50_s"] == pytest.approx(2.0)
    assert summary["llm_only"]["latency_p95_s"] == pytest.approx(2.9)
    assert result.summary["pareto_front"] == ["slm_only", "llm_only"]

    # Resume: a run killed mid-write leaves a torn line; it is cut, only that pair reruns.
    path = out / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:25])
    runner.calls.clear()
    again = run_evaluation(questions, specs, runner, out, dataset="tiny", progress=False)
    assert again.ran == 1 and again.skipped == 14 and len(runner.calls) == 1
    assert len(read_rows(out)) == 15
    assert_summary_matches_rows(out, [s.label for s in specs])

    # A new strategy in the same folder runs only its own column.
    runner.calls.clear()
    more = parse_strategies("tandem,tandem@economy,llm_only,slm_only,fixed:50,tandem@0.25")
    extended = run_evaluation(questions, more, runner, out, dataset="tiny", progress=False)
    assert extended.ran == 3 and {label for label, _ in runner.calls} == {"tandem@0.25"}


def test_resuming_with_other_params_is_refused(dataset: Path, tmp_path: Path) -> None:
    questions = load_questions(dataset, limit=1)
    runner = ScriptedRunner({})
    run_evaluation(questions, parse_strategies("tandem"), runner, tmp_path, progress=False)
    other = parse_strategies("tandem", {"budgets": [0, 50]})
    with pytest.raises(EvaluationError, match="another --out folder"):
        run_evaluation(questions, other, runner, tmp_path, progress=False)


def test_datasets_in_gsm8k_and_math_form(dataset: Path, tmp_path: Path) -> None:
    questions = load_questions(dataset)
    assert [q.reference for q in questions] == ["5", "2400", "\\frac{3}{4}"]
    assert questions[2].id == "test/prealgebra/7.json" and questions[2].level == "Level 1"
    assert questions[0].id != questions[1].id
    assert [q.index for q in load_questions(dataset, limit=2)] == [0, 1]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "x", "answer": "1"}\n{"question": "y"}\n')
    with pytest.raises(EvaluationError, match=r"broken.jsonl:2: needs 'question'"):
        load_questions(broken)


def test_strategy_specs_and_operating_points() -> None:
    specs = parse_strategies("tandem@economy, tandem@0.5,fixed:100,llm_only", {"budgets": [0, 64]})
    assert [s.label for s in specs] == ["tandem@economy", "tandem@0.5", "fixed:100", "llm_only"]
    assert [s.strategy for s in specs] == ["tandem", "tandem", "fixed:100", "llm_only"]
    assert specs[0].params == {"budgets": [0, 64], "cost_preference": "economy"}
    assert specs[1].params["cost_preference"] == 0.5
    for text, message in (
        ("tandem,tandem", "listed twice"),
        ("tandem@cheap", "operating point 'cheap'"),
        ("nope", "unknown strategy"),
        ("", "at least one strategy"),
    ):
        with pytest.raises(EvaluationError, match=message):
            parse_strategies(text)


def test_wilson_interval_and_pareto_front() -> None:
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    points = [
        {"label": "a", "n": 1, "accuracy": 0.5, "mean_tflops": 1.0},
        {"label": "b", "n": 1, "accuracy": 0.4, "mean_tflops": 2.0},
        {"label": "c", "n": 1, "accuracy": 0.7, "mean_tflops": 3.0},
        {"label": "d", "n": 1, "accuracy": 0.7, "mean_tflops": 3.0},
    ]
    assert pareto_front(points) == ["a", "c"]


def test_results_file_keeps_complete_lines(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "results.jsonl")
    results.append({"strategy": "s", "question_id": "q1"})
    (tmp_path / "results.jsonl").write_text(
        (tmp_path / "results.jsonl").read_text() + "not json\n" + '{"strategy": "s"'
    )
    with pytest.raises(EvaluationError, match=r"results\.jsonl:2: not a result row"):
        results.load()


# --- through a running service (API + one worker per queue) ------------------------------


@pytest.mark.slow
@pytest.mark.model
def test_eval_through_the_services_over_rest(
    dataset: Path, tmp_path: Path, service_env: dict[str, str], api_key: str
) -> None:
    from click.testing import CliRunner

    from services.cli import cli
    from tests import infra

    processes = infra.Processes({**service_env, "TANDEM_LOCAL_THREADS": "1"}, tmp_path)
    port = infra.free_port()
    out = tmp_path / "out"
    argv = [
        "eval", "--dataset", str(dataset), "--limit", "2", "--strategies", "tandem,slm_only",
        "--params", json.dumps(TINY_PARAMS), "--out", str(out), "--no-progress",
        "--services", f"http://127.0.0.1:{port}", "--key", api_key,
    ]  # fmt: skip
    try:
        for queue in ("coordinator", "classifier", "executor"):
            processes.worker(queue)
        processes.api(port)
        first = CliRunner().invoke(cli, argv, catch_exceptions=False)
        assert first.exit_code == 0, first.output
        assert "ran 4 job(s)" in first.output
    finally:
        processes.stop_all()
    rows = read_rows(out)
    assert all(row["job_id"].startswith("job_") and row["error"] is None for row in rows)
    assert all(row["latency_s"] > 0 for row in rows)
    assert [s["kind"] for s in rows[0]["stages"]][-1] == "executor"
    assert_summary_matches_rows(out, ["tandem", "slm_only"])


def test_error_rows_count_as_wrong_and_can_be_retried(dataset: Path, tmp_path: Path) -> None:
    questions = load_questions(dataset)
    specs = parse_strategies("llm_only")

    class Flaky(ScriptedRunner):
        fail = True

        def run(self, spec: StrategySpec, question: Question) -> JobRun:
            if self.fail and question.index == 1:
                return JobRun({}, 0.1, error="context overflow")
            return super().run(spec, question)

    runner = Flaky(ANSWERS)
    first = run_evaluation(questions, specs, runner, tmp_path, progress=False)
    [entry] = first.summary["strategies"]
    assert (entry["n"], entry["correct"], entry["errors"]) == (3, 2, 1)
    assert "in an error (counted as wrong): llm_only 1." in (tmp_path / "table.md").read_text()
    assert run_evaluation(questions, specs, runner, tmp_path, progress=False).ran == 0
    runner.fail = False
    again = run_evaluation(questions, specs, runner, tmp_path, progress=False, retry_errors=True)
    assert again.ran == 1
    [entry] = again.summary["strategies"]
    assert (entry["n"], entry["correct"], entry["errors"]) == (3, 3, 0)
    assert len(read_rows(tmp_path)) == 3


# --- code: HumanEval problems, answers graded in the sandbox --------------------------------

CODE_PARAMS = {"budgets": [0, 8], "executor_max_tokens": 24, "llm_max_tokens": 24}


@pytest.fixture
def code_dataset(tmp_path: Path) -> Path:
    return write_problems(tmp_path / "code3.jsonl")


@pytest.fixture(scope="module")
def grader():
    from services.grading.humaneval import Grader
    from services.grading.sandbox import SandboxLimits, SandboxUnavailable, find_bwrap

    try:
        find_bwrap()
    except SandboxUnavailable as error:
        pytest.skip(f"bubblewrap is not installed: run scripts/install_test_deps.sh ({error})")
    return Grader(SandboxLimits(timeout_s=5.0), workers=2)


def test_humaneval_datasets_make_code_jobs(code_dataset: Path, tmp_path: Path) -> None:
    from services.evaluation.harness import with_dataset_task

    questions = load_questions(code_dataset)
    assert [q.id for q in questions] == ["Own/0", "Own/1", "Own/2"]
    assert {q.task for q in questions} == {"code"} and questions[0].reference is None
    assert questions[0].text == PROBLEMS[0]["prompt"]
    assert questions[0].job_params == {"entry_point": "has_pair_with_sum"}
    assert len(load_questions(code_dataset, limit=2)) == 2
    params = with_dataset_task({"budgets": [0, 8]}, questions)
    assert params == {"budgets": [0, 8], "task": "code"}
    assert parse_strategies("slm_only", params)[0].params == {"budgets": [0, 8], "task": "code"}
    with pytest.raises(EvaluationError, match="holds code questions, but the params ask for task 'math'"):
        with_dataset_task({"task": "math"}, questions)
    with pytest.raises(EvaluationError, match="entry_point comes from each problem"):
        with_dataset_task({"entry_point": "f"}, questions)
    gsm = [Question(0, "q", "1 + 1?", "2")]
    assert with_dataset_task({}, gsm) == {}  # math params stay as they were
    with pytest.raises(EvaluationError, match="holds math questions"):
        with_dataset_task({"task": "code"}, gsm)
    # specs of another task are refused before any job runs
    with pytest.raises(EvaluationError, match="runs task 'math' on code questions"):
        run_evaluation(questions, parse_strategies("slm_only"), ScriptedRunner({}), tmp_path)
    # a file mixing the two formats is refused, by file and line
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(PROBLEMS[0]) + "\n" + json.dumps(GSM8K_LINES[0]) + "\n")
    with pytest.raises(EvaluationError, match=r"mixed.jsonl:2: missing fields"):
        load_questions(mixed)


def test_the_test_problems_are_sound(code_dataset: Path, grader) -> None:
    """Each test problem's canonical solution passes its tests in the sandbox."""
    grades = list(grader.grade_many((q.problem, None) for q in load_questions(code_dataset)))
    assert [g.verdict for g in grades] == ["passed"] * len(PROBLEMS), [g.reason for g in grades]


class CodeRunner(ScriptedRunner):
    """Code answers from a script: (label, question index) -> (answer, final text) or an
    error string."""

    def __init__(self, replies: dict[tuple[str, int], Any]) -> None:
        super().__init__({})
        self.replies = replies

    def run(self, spec: StrategySpec, question: Question) -> JobRun:
        reply = self.replies.get((spec.label, question.index), (None, ""))
        if isinstance(reply, str):
            return JobRun({}, 0.5, error=reply)
        run = super().run(spec, question)
        run.job["answer"], run.job["final_text"] = reply
        return run


def test_code_answers_are_graded_in_the_sandbox(code_dataset: Path, tmp_path: Path, grader) -> None:
    questions = load_questions(code_dataset)
    canonical = [q.problem.prompt + q.problem.canonical_solution for q in questions]
    wrong = "def has_pair_with_sum(numbers, target):\n    return False\n"
    replies = {
        ("llm_only", 0): (canonical[0], "..."),  # the right function: passed
        ("llm_only", 1): (None, questions[1].problem.canonical_solution),  # a body: graded too
        ("llm_only", 2): (None, "I do not know."),  # no function: error
        ("slm_only", 0): (wrong, "..."),  # a wrong function: failed
        ("slm_only", 1): "context overflow",  # the job failed: not graded
        ("slm_only", 2): ("def digit_sum(n):\n    while True:\n        pass\n", ""),
    }
    specs = parse_strategies("llm_only,slm_only", {"task": "code"})
    out = tmp_path / "out"
    result = run_evaluation(
        questions, specs, CodeRunner(replies), out, dataset="he", progress=False, grader=grader
    )
    rows = {(r["strategy"], r["question_index"]): r for r in read_rows(out)}
    verdicts = {key: row["verdict"] for key, row in rows.items()}
    assert verdicts == {
        ("llm_only", 0): "passed",
        ("llm_only", 1): "passed",
        ("llm_only", 2): "error",
        ("slm_only", 0): "failed",
        ("slm_only", 1): None,
        ("slm_only", 2): "timeout",
    }
    assert [row["correct"] for row in rows.values()].count(True) == 2
    assert rows[("slm_only", 0)]["grade_reason"].startswith("AssertionError")
    assert "no function named digit_sum" in rows[("llm_only", 2)]["grade_reason"]
    assert all(row["task"] == "code" and row["params"] == {"task": "code"} for row in rows.values())
    assert_summary_matches_rows(out, ["llm_only", "slm_only"])
    summary = {e["label"]: e for e in result.summary["strategies"]}
    assert result.summary["metric"] == "pass@1" and result.summary["task"] == "code"
    assert summary["llm_only"]["verdicts"] == {"passed": 2, "error": 1}
    assert summary["slm_only"]["verdicts"] == {"failed": 1, "timeout": 1, "not graded": 1}
    table = (out / "table.md").read_text()
    assert "# Evaluation: pass@1 against cost" in table and "| pass@1 [95% CI] |" in table
    assert "Verdicts: llm_only 2 passed, 1 error; slm_only 1 failed, 1 timeout, 1 not graded." in table
    assert table_cells(out)["llm_only"]["pass@1 [95% CI]"].startswith("66.7%")


@pytest.mark.model
def test_eval_on_humaneval_embedded_grades_every_answer(
    code_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grader
) -> None:
    from click.testing import CliRunner

    from services.cli import cli
    from services.settings import get_settings

    monkeypatch.setenv("TANDEM_LOCAL_THREADS", "1")
    monkeypatch.setenv("TANDEM_LOCAL_MAX_BATCH", "4")
    monkeypatch.setenv("TANDEM_GRADER_TIMEOUT_S", "5")
    get_settings.cache_clear()
    out = tmp_path / "out"
    labels = ["tandem", "slm_only"]
    argv = [
        "eval", "--dataset", str(code_dataset), "--strategies", ",".join(labels),
        "--params", json.dumps(CODE_PARAMS), "--out", str(out), "--no-progress",
    ]  # fmt: skip
    try:
        done = CliRunner().invoke(cli, argv, catch_exceptions=False)
    finally:
        get_settings.cache_clear()
    assert done.exit_code == 0, done.output
    assert "ran 6 job(s)" in done.output and "| pass@1 [95% CI] |" in done.output
    rows = read_rows(out)
    assert len(rows) == 6 and {r["question_id"] for r in rows} == {f"Own/{i}" for i in range(3)}
    entry = dict(zip([p["task_id"] for p in PROBLEMS], ENTRY_POINTS, strict=True))
    for row in rows:
        assert row["task"] == "code" and row["params"]["task"] == "code" and row["error"] is None
        assert row["verdict"] in {"passed", "failed", "timeout", "error"}, row
        assert row["correct"] == (row["verdict"] == "passed")
        assert row["verdict"] == "passed" or row["grade_reason"], row  # a reason when not passed
        # every code job says which function it looked for and what it found
        assert row["outcome"]["extraction"].startswith(f"{entry[row['question_id']]}: ")
        if row["answer"] is not None:  # the extracted function itself ran against the tests
            assert row["verdict"] in {"passed", "failed", "timeout"}, row
    assert_summary_matches_rows(out, labels)


@pytest.mark.slow
@pytest.mark.model
def test_eval_on_humaneval_through_the_services(
    code_dataset: Path, tmp_path: Path, service_env: dict[str, str], api_key: str, grader
) -> None:
    """Jobs run by the API and the workers; their answers are graded here, in the eval
    process (the services never run code)."""
    from click.testing import CliRunner

    from services.cli import cli
    from tests import infra

    processes = infra.Processes({**service_env, "TANDEM_LOCAL_THREADS": "1"}, tmp_path)
    port = infra.free_port()
    out = tmp_path / "out"
    argv = [
        "eval", "--dataset", str(code_dataset), "--limit", "2", "--strategies", "fixed:8",
        "--params", json.dumps(CODE_PARAMS), "--out", str(out), "--no-progress",
        "--services", f"http://127.0.0.1:{port}", "--key", api_key,
    ]  # fmt: skip
    try:
        for queue in ("coordinator", "executor"):
            processes.worker(queue)
        processes.api(port)
        done = CliRunner().invoke(cli, argv, catch_exceptions=False)
        assert done.exit_code == 0, done.output
    finally:
        processes.stop_all()
    rows = read_rows(out)
    assert len(rows) == 2 and all(row["job_id"].startswith("job_") for row in rows)
    for row in rows:
        assert row["error"] is None and row["verdict"] in {"passed", "failed", "timeout", "error"}
        assert "extraction" in row["outcome"]
    assert_summary_matches_rows(out, ["fixed:8"])
