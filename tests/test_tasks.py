"""Task types (params.task: math, code, text): the prompts of each task (exact text), the
answer each task reads from a reply, every strategy with every task (scripted records, and
embedded with the real model), the param accepted and refused the same way by the CLI, REST
and batch lines, and no service process importing the grader."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from services.core import prompts
from services.core.params import JobParams
from services.core.requests import InvalidRequest, JobRequest, parse_job_request
from services.core.steps import Generate, Judge, StageRecord
from services.core.strategies import program_for
from services.core.tasks import REGISTRY, job_task, last_function
from services.core.workflow import Finished, advance

ADD = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
SKY = "Why is the sky blue?"
MATH_Q = "Q?"
STRATEGIES = ["tandem", "fixed:8", "llm_only", "slm_only", "scot", "relay"]
QUESTION_OF = {"math": "Tom has 2 apples and buys 3 more. How many now?", "code": ADD, "text": SKY}


def params(**values: Any) -> JobParams:
    return JobParams.model_validate(values)


# --- prompts: exact text -------------------------------------------------------------------

MATH_SNAPSHOT = {
    "coordinator": (
        {
            "role": "system",
            "content": "You are the coordinator of a two-model team. You do not solve the problem to the end: you write the critical thinking insights that let a smaller model solve it. Write them in four labelled parts, most important first:\nGoal: the objective, its constraints, and the form the answer must take.\nPlanning: the strategy: how to break the problem down, and edge cases to watch.\nRetrieval: facts, formulas or definitions the solution needs (or N/A).\nAction: concrete first steps and intermediate results.\nBe concise and concrete.",
        },
        {
            "role": "user",
            "content": "Problem:\nQ?\n\nWrite the thinking insights (Goal, Planning, Retrieval, Action).",
        },
    ),
    "executor": (
        {"role": "system", "content": "You are a careful problem solver. Reason step by step, then answer."},
        {"role": "user", "content": "Q?\n\nPut the final answer in \\boxed{}."},
    ),
    "executor_with_insights": (
        {"role": "system", "content": "You are a careful problem solver. Reason step by step, then answer."},
        {
            "role": "user",
            "content": "Q?\n\n[Thinking Insights]\nA stronger model started on this problem. Its insights may cover:\n- Goal: the objective, its constraints, and the form the answer must take\n- Planning: the strategy: how to break the problem down, and edge cases to watch\n- Retrieval: facts, formulas or definitions the solution needs (or N/A)\n- Action: concrete first steps and intermediate results\n\nGoal: x\n\nUse the insights, check them, finish the reasoning yourself. Put the final answer in \\boxed{}.",
        },
    ),
    "solver": (
        {"role": "system", "content": "You are a careful problem solver. Reason step by step, then answer."},
        {"role": "user", "content": "Q?\n\nPut the final answer in \\boxed{}."},
    ),
    "selection": (
        (
            {
                "role": "user",
                "content": "Several reasoning paths were written for the problem below. Judge which one reasons best towards a correct answer, and reply with the number of that path only.\n\nProblem:\nQ?\n\nReason 1: a\n\nReason 2: b\n\nReason 3: All reasoning paths above are wrong.",
            },
        ),
        "Number of the best reasoning path: ",
    ),
}  # fmt: skip

CODE_COORDINATOR = "You are the coordinator of a two-model team. You do not write the code: you write the critical thinking insights that let a smaller model write it. Write them in four labelled parts, most important first:\nGoal: what the function must return for its inputs, and the constraints it must keep.\nPlanning: the algorithm: how to break the task down.\nRetrieval: the Python built-ins, library functions and data structures it needs, and the edge cases to handle (empty input, ties, negatives, ...).\nAction: the concrete steps of the implementation, in order.\nBe concise and concrete."  # fmt: skip
CODE_SYSTEM = "You are a careful Python programmer. Think the task through, then write the code."
CODE_SHOWN = 'Complete this Python function:\n```python\ndef add(a: int, b: int) -> int:\n    """Return a + b."""\n```'  # fmt: skip
CODE_FORMAT = "Write the complete function, signature included, with the imports it needs, in one ```python code block."  # fmt: skip
CODE_GLOSSARY = "- Goal: what the function must return for its inputs, and the constraints it must keep\n- Planning: the algorithm: how to break the task down\n- Retrieval: the Python built-ins, library functions and data structures it needs, and the edge cases to handle (empty input, ties, negatives, ...)\n- Action: the concrete steps of the implementation, in order"  # fmt: skip

TEXT_COORDINATOR = "You are the coordinator of a two-model team. You do not write the answer: you write the critical thinking insights that let a smaller model write it. Write them in four labelled parts, most important first:\nGoal: what the answer must achieve, and the form it should take.\nPlanning: how to structure the answer, and the pitfalls to avoid.\nRetrieval: facts, definitions or sources the answer needs (or N/A).\nAction: the key points to make, in order.\nBe concise and concrete."  # fmt: skip
TEXT_SYSTEM = "You are a careful assistant. Answer accurately and to the point."


def test_math_prompts_are_unchanged_byte_for_byte() -> None:
    """Math results must not move: the default task's text is exactly what it was."""
    got = {
        "coordinator": prompts.coordinator_messages(MATH_Q),
        "executor": prompts.executor_messages(MATH_Q),
        "executor_with_insights": prompts.executor_messages(MATH_Q, "<think>Goal: x</think>"),
        "solver": prompts.solver_messages(MATH_Q),
        "selection": prompts.selection_messages(MATH_Q, ["a", " b "]),
    }
    assert got == MATH_SNAPSHOT
    task = job_task(MATH_Q, JobParams())
    assert task.name == "math" and task.prompts is prompts.MATH
    assert task.coordinator_messages() == MATH_SNAPSHOT["coordinator"]
    assert task.executor_messages("Goal: x") == MATH_SNAPSHOT["executor_with_insights"]
    assert task.selection_messages(["a", "b"]) == MATH_SNAPSHOT["selection"]
    assert MATH_SNAPSHOT["coordinator"][0]["content"] == prompts.COORDINATOR_SYSTEM


def test_code_prompts_exact_text() -> None:
    task = job_task(ADD, params(task="code"))
    assert task.coordinator_messages() == (
        {"role": "system", "content": CODE_COORDINATOR},
        {
            "role": "user",
            "content": f"Task:\n{CODE_SHOWN}\n\nWrite the thinking insights (Goal, Planning, Retrieval, Action).",
        },
    )
    assert task.solver_messages() == (
        {"role": "system", "content": CODE_SYSTEM},
        {"role": "user", "content": f"{CODE_SHOWN}\n\n{CODE_FORMAT}"},
    )
    assert task.executor_messages("") == task.solver_messages()
    assert task.executor_messages("<think>Goal: g</think>") == (
        {"role": "system", "content": CODE_SYSTEM},
        {
            "role": "user",
            "content": f"{CODE_SHOWN}\n\n[Thinking Insights]\nA stronger model started on this task. Its insights may cover:\n{CODE_GLOSSARY}\n\nGoal: g\n\nUse the insights, check them, and write the function yourself. {CODE_FORMAT}",
        },
    )  # fmt: skip
    assert task.selection_messages(["one", " two "]) == (
        (
            {
                "role": "user",
                "content": f"Several candidate solutions were written for the programming task below. Judge which one is most likely correct, and reply with the number of that solution only.\n\nTask:\n{CODE_SHOWN}\n\nSolution 1: one\n\nSolution 2: two\n\nSolution 3: All solutions above are wrong.",
            },
        ),
        "Number of the best solution: ",
    )  # fmt: skip
    # a prose task is shown as it is, not fenced
    prose = job_task("Write a function add(a, b) returning the sum.", params(task="code"))
    assert prose.solver_messages()[1]["content"] == (
        f"Write a function add(a, b) returning the sum.\n\n{CODE_FORMAT}"
    )


def test_text_prompts_exact_text() -> None:
    task = job_task(SKY, params(task="text"))
    assert task.coordinator_messages() == (
        {"role": "system", "content": TEXT_COORDINATOR},
        {
            "role": "user",
            "content": "Question:\nWhy is the sky blue?\n\nWrite the thinking insights (Goal, Planning, Retrieval, Action).",
        },
    )  # fmt: skip
    assert task.solver_messages() == (
        {"role": "system", "content": TEXT_SYSTEM},
        {"role": "user", "content": "Why is the sky blue?"},
    )
    assert task.executor_messages("Goal: g") == (
        {"role": "system", "content": TEXT_SYSTEM},
        {
            "role": "user",
            "content": "Why is the sky blue?\n\n[Thinking Insights]\nA stronger model started on this question. Its insights may cover:\n- Goal: what the answer must achieve, and the form it should take\n- Planning: how to structure the answer, and the pitfalls to avoid\n- Retrieval: facts, definitions or sources the answer needs (or N/A)\n- Action: the key points to make, in order\n\nGoal: g\n\nUse the insights, check them, and write the answer yourself.",
        },
    )  # fmt: skip
    assert task.selection_messages(["one", "two"]) == (
        (
            {
                "role": "user",
                "content": "Several answers were written for the question below. Judge which one answers it best, and reply with the number of that answer only.\n\nQuestion:\nWhy is the sky blue?\n\nAnswer 1: one\n\nAnswer 2: two\n\nAnswer 3: All answers above are poor.",
            },
        ),
        "Number of the best answer: ",
    )  # fmt: skip


def test_the_classifier_text_is_the_same_for_every_task() -> None:
    """A classifier trained on one task reads the same features on another (transfer)."""
    assert prompts.classifier_text(ADD, "h") == f"Question: {ADD}\n\nHint: h\n\nAnswer:"


# --- answers ------------------------------------------------------------------------------

REPLY = (
    "Here is the solution.\n```python\nimport math\n\n\ndef helper(x):\n    return x\n\n\n"
    "def add(a, b):\n    return helper(a) + b\n\n\nprint(add(1, 2))\n```\nIt adds."
)
ADD_CODE = "def helper(x):\n    return x\n\ndef add(a, b):\n    return helper(a) + b\n"


def test_answers_per_task() -> None:
    math = job_task(MATH_Q, JobParams())
    assert math.answer("so \\boxed{5}.").value == "5"
    assert math.outcome("so \\boxed{5}.").summary == {}  # math outcomes keep their shape

    text = job_task(SKY, params(task="text"))
    assert text.answer("  Rayleigh scattering.\n").value == "Rayleigh scattering."
    assert text.answer(" \n").value is None
    assert text.outcome("Rayleigh \\boxed{5}").answer == "Rayleigh \\boxed{5}"  # nothing extracted

    code = job_task(ADD, params(task="code"))
    assert code.entry_point == "add"  # the question's last top-level def
    found = code.answer(REPLY)
    assert found.value == ADD_CODE
    assert found.note == "add: from the last fenced block of 1"
    assert code.outcome(REPLY, {"x": 1}).summary == {"x": 1, "extraction": found.note}
    missing = code.outcome("I cannot do that.")
    assert missing.answer is None
    assert missing.summary["extraction"] == "add: no function named add in the reply"
    cut = code.answer("```python\ndef add(a, b):\n    return (a +\n")
    assert cut.value is None and "does not parse" in (cut.note or "")
    # SCoT: the continuation first, then draft + continuation
    assert code.answer("no code here", REPLY).value == ADD_CODE


def test_which_function_a_code_job_extracts() -> None:
    helpers = "def helper():\n    pass\n\n\ndef solve(x):\n    '''doc'''\n"
    assert last_function(helpers) == "solve" and last_function("prose") is None
    reply = "```python\ndef solve(x):\n    return 1\n\ndef other(x):\n    return 2\n```"
    # the entry point param wins over the question's last def
    named = job_task(helpers, params(task="code", entry_point="other"))
    assert named.answer(reply).value == "def other(x):\n    return 2\n"
    assert job_task(helpers, params(task="code")).answer(reply).value == (
        "def solve(x):\n    return 1\n"
    )
    # a prose question: the reply's last top-level function
    prose = job_task("Write any function.", params(task="code"))
    assert prose.entry_point is None
    assert prose.answer(reply).value == "def other(x):\n    return 2\n"
    assert prose.answer("no code").note == "no function defined in the reply"
    assert prose.answer("").note == "empty reply"


# --- the param ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, fragment",
    [
        ({"task": "poem"}, "params.task: Input should be 'math', 'code' or 'text'"),
        ({"task": "code", "entry_point": "1add"}, "'1add' is not a Python function name"),
        ({"task": "code", "entry_point": "class"}, "'class' is not a Python function name"),
        ({"entry_point": "add"}, "entry_point is for task 'code' (this job's task is 'math')"),
        ({"task": "text", "entry_point": "add"}, "entry_point is for task 'code'"),
    ],
)
def test_bad_task_params_are_refused_with_a_clear_message(given: dict, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_job_request({"question": ADD, "params": given}, 8000)
    assert fragment in str(raised.value), str(raised.value)


def test_task_params_are_accepted_and_math_is_the_default() -> None:
    request = parse_job_request({"question": ADD, "params": {"task": "code"}}, 8000)
    assert request.params.task == "code" and request.params.entry_point is None
    assert JobParams().task == "math"
    # a math job's stored params (non-default values) do not mention the task
    assert "task" not in JobParams().model_dump(exclude_defaults=True)


# --- every strategy with every task, scripted (no model) ---------------------------------

REPLIES = {
    "math": "First 2 + 3 = 5, so \\boxed{5}.",
    "code": "```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```",
    "text": "Sunlight scatters off air molecules, blue most.",
}
ANSWERS = {
    "math": "5",
    "code": "def add(a: int, b: int) -> int:\n    return a + b\n",
    "text": "Sunlight scatters off air molecules, blue most.",
}


def drive(request: JobRequest) -> tuple[list[Generate], Any]:
    """Run a strategy to the end on scripted records: every model writes the task's reply
    (the coordinator's insights a fixed text), the classifier never stops early, SCoT picks
    draft 1. Returns the generation steps asked for and the outcome."""
    program = program_for(request)
    recorded: dict[int, StageRecord] = {}
    asked: list[Generate] = []
    reply = REPLIES[request.params.task]
    wording = REGISTRY[request.params.task].prompts
    while True:
        progress = advance(program, recorded)
        if isinstance(progress, Finished):
            return asked, progress.outcome
        for seq, step in progress.steps:
            if isinstance(step, Judge):
                output = {"probability": 0.1, "threshold": 0.5, "sufficient": False}
                recorded[seq] = StageRecord(seq, "classifier", "classifier", "m", output=output)
                continue
            asked.append(step)
            insights = step.messages[0]["content"] == wording.coordinator_system
            text = "Goal: add." if insights else "1" if step.kind == "select" else reply
            recorded[seq] = StageRecord(
                seq,
                step.kind,
                step.role,
                "m",
                generated_tokens=4,
                output={"text": text, "finish_reason": "stop"},
            )


@pytest.mark.parametrize("task", ["math", "code", "text"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_uses_the_task_prompts_and_extraction(strategy: str, task: str) -> None:
    question = QUESTION_OF[task]
    request = JobRequest(question=question, strategy=strategy, params=params(task=task))
    asked, outcome = drive(request)
    wording = REGISTRY[task].prompts
    allowed_system = {
        wording.coordinator_system,
        wording.executor_system,
        wording.solver_system,
    }
    assert asked, "the strategy asked for no model"
    for step in asked:
        first = step.messages[0]
        if step.kind == "select":
            assert first["content"].startswith(wording.selection_instruction)
            assert step.continuation == wording.selection_cue
        else:
            assert first["role"] == "system" and first["content"] in allowed_system, step.kind
            assert wording.present(question) in step.messages[1]["content"]
    assert outcome.answer == ANSWERS[task]
    assert ("extraction" in outcome.summary) == (task == "code")


# --- every strategy with every task, embedded with the real model -------------------------

TINY = {
    "budgets": [0, 4, 8],
    "executor_max_tokens": 8,
    "llm_max_tokens": 8,
    "drafts": 2,
    "draft_max_tokens": 6,
    "relay_budget": 8,
    "relay_turns": 2,
}


@pytest.fixture(scope="module")
def engines() -> Iterator[Any]:
    from services.core.engines import Engines
    from services.settings import Settings

    engines = Engines(Settings(local_max_batch=4, local_context=2048, local_threads=1))
    yield engines
    engines.close()


@pytest.mark.model
@pytest.mark.parametrize("task", ["math", "code", "text"])
def test_every_strategy_and_task_runs_embedded(engines: Any, task: str) -> None:
    from services.core.runner import run_job

    for strategy in STRATEGIES:
        request = parse_job_request(
            {"question": QUESTION_OF[task], "strategy": strategy, "params": {**TINY, "task": task}},
            8000,
        )
        result = run_job(request, engines)
        outcome = result.outcome
        assert result.stages and all(s.model for s in result.stages), strategy
        assert isinstance(outcome.final_text, str)
        if task == "text":
            assert outcome.answer == (outcome.final_text.strip() or None)
        elif task == "code":
            note = outcome.summary["extraction"]
            assert note.startswith("add: "), note
            if outcome.answer is None:  # a clear failure: why there is no function
                assert note.split(": ", 1)[1] in {
                    "empty reply",
                    "no function named add in the reply",
                    "the function add in the reply does not parse",
                }, note
            else:  # the extracted function, which parses and defines add
                module = ast.parse(outcome.answer)
                assert any(
                    isinstance(node, ast.FunctionDef) and node.name == "add"
                    for node in module.body
                )
        else:
            assert "extraction" not in outcome.summary
            assert outcome.answer is None or isinstance(outcome.answer, str)
        # the JSON a job shows carries the same answer
        assert result.to_json()["answer"] == outcome.answer


@pytest.mark.model
def test_tandem_run_with_task_from_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from services.cli import cli
    from services.settings import get_settings

    monkeypatch.setenv("TANDEM_LOCAL_THREADS", "1")
    get_settings.cache_clear()
    try:
        tiny = json.dumps({"executor_max_tokens": 6, "budgets": [0, 4]})
        argv = ["run", ADD, "--task", "code", "--params", tiny, "--json", "--no-record"]
        done = CliRunner().invoke(cli, argv, catch_exceptions=False)
        assert done.exit_code == 0, done.output
        payload = json.loads(done.output)
        assert payload["summary"]["extraction"].startswith("add: ")
        text = CliRunner().invoke(
            cli, ["run", SKY, "--task", "text", "--strategy", "slm_only", "--params", tiny,
                  "--json", "--no-record"], catch_exceptions=False,
        )  # fmt: skip
        assert text.exit_code == 0, text.output
        payload = json.loads(text.output)
        assert payload["answer"] == (payload["final_text"].strip() or None)
        bad = CliRunner().invoke(cli, ["run", SKY, "--task", "poem", "--no-record"])
        assert bad.exit_code != 0 and "poem" in bad.output
    finally:
        get_settings.cache_clear()


# --- REST and batch lines ----------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.tasks: list = []
        self.lock = threading.Lock()

    def __call__(self, tasks) -> None:
        with self.lock:
            self.tasks.extend(tasks)


@pytest.fixture(scope="module")
def client(in_process_settings) -> FlaskClient:
    from services.api import create_app

    return create_app(in_process_settings, enqueue=Recorder()).test_client()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_rest_jobs_take_the_task(client: FlaskClient, api_key: str) -> None:
    body = {"question": ADD, "strategy": "slm_only", "params": {"task": "code", "entry_point": "add"}}
    created = client.post("/v1/jobs", json=body, headers=auth(api_key))
    assert created.status_code == 202, created.get_data(as_text=True)
    job = client.get(created.get_json()["status_url"], headers=auth(api_key)).get_json()
    assert job["params"] == {"task": "code", "entry_point": "add"}
    for params_, fragment in [
        ({"task": "poem"}, "params.task"),
        ({"entry_point": "add"}, "entry_point is for task 'code'"),
        ({"task": "code", "entry_point": "not a name"}, "is not a Python function name"),
    ]:
        refused = client.post("/v1/jobs", json={"question": ADD, "params": params_}, headers=auth(api_key))
        assert refused.status_code == 422, refused.get_data(as_text=True)
        assert refused.mimetype == "application/problem+json"
        assert fragment in refused.get_json()["detail"]


def test_openapi_documents_the_task(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    properties = document["components"]["schemas"]["JobParams"]["properties"]
    assert properties["task"]["enum"] == ["math", "code", "text"]
    assert properties["task"]["default"] == "math" and "entry_point" in properties


def test_batch_lines_take_the_task(client: FlaskClient, api_key: str) -> None:
    lines = [
        {"custom_id": "code", "question": ADD, "params": {"task": "code", "entry_point": "add"}},
        {"custom_id": "text", "question": SKY, "params": {"task": "text"}},
        {"custom_id": "math", "question": QUESTION_OF["math"]},
        {"custom_id": "bad", "question": SKY, "params": {"task": "poem"}},
        {"custom_id": "stray", "question": SKY, "params": {"entry_point": "f"}},
    ]
    body = "".join(json.dumps(line) + "\n" for line in lines)
    response = client.post(
        "/v1/batches?strategy=slm_only",
        data=body,
        headers={**auth(api_key), "Content-Type": "application/jsonl"},
    )
    assert response.status_code == 202, response.get_data(as_text=True)
    batch = response.get_json()
    assert batch["lines"] == {"total": 5, "valid": 3, "invalid": 2}
    errors = {error["line"]: error["error"] for error in batch["errors"]}
    assert "params.task" in errors[4] and "entry_point is for task 'code'" in errors[5]

    def stored() -> dict[str, Any]:
        listed = client.get(f"/v1/jobs?batch_id={batch['id']}", headers=auth(api_key)).get_json()
        return {job["custom_id"]: job["params"] for job in listed["data"]}

    from tests import infra

    infra.wait_for(lambda: len(stored()) == 3, 30, "the batch's jobs", interval=0.05)
    assert stored() == {
        "code": {"task": "code", "entry_point": "add"},
        "text": {"task": "text"},
        "math": {},
    }


# --- grading never happens in a service process --------------------------------------------


def test_no_service_process_imports_the_grader() -> None:
    """The API and the workers never import the sandboxed grader or the evaluation package,
    even after planning and finishing a code job: a job's code answer is only parsed
    (extract_code), never run, there."""
    code = f"""
import sys
from services.api import create_app
import workers.app, workers.tasks
from services.core.params import JobParams
from services.core.requests import JobRequest
from services.core.steps import StageRecord
from services.core.strategies import program_for
from services.core.workflow import advance, Finished
create_app
request = JobRequest(question={ADD!r}, strategy="slm_only", params=JobParams(task="code"))
reply = "```python\\ndef add(a, b):\\n    return a + b\\n```"
record = StageRecord(0, "executor", "executor", "m", output={{"text": reply, "finish_reason": "stop"}})
done = advance(program_for(request), {{0: record}})
assert isinstance(done, Finished) and done.outcome.answer.startswith("def add"), done
print(sorted(m for m in sys.modules if m.startswith(("services.grading", "services.evaluation"))))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
