"""The strategies' control flow, driven by hand-made stage records (no model): which steps
they ask for, when the classifier stops the coordinator, and how replay resumes."""

from __future__ import annotations

from functools import partial

import pytest

from services.core.params import JobParams
from services.core.prompts import classifier_text, coordinator_messages, executor_messages
from services.core.requests import InvalidRequest, JobRequest, parse_job_request
from services.core.steps import Generate, Judge, StageRecord
from services.core.strategies import program_for
from services.core.strategies.tandem import tandem
from services.core.workflow import Finished, Pending, ReplayMismatch, advance

QUESTION = "A box holds 3 red and 5 blue marbles. How many marbles are in 4 boxes?"


def generated(
    seq: int, step: Generate, tokens: int, text: str, finish: str = "length"
) -> StageRecord:
    return StageRecord(
        seq=seq,
        kind=step.kind,
        role=step.role,
        model="m",
        generated_tokens=tokens,
        output={"text": text, "finish_reason": finish},
    )


def judged(seq: int, sufficient: bool) -> StageRecord:
    return StageRecord(
        seq=seq,
        kind="classifier",
        role="classifier",
        model="m",
        output={
            "probability": 0.9 if sufficient else 0.1,
            "threshold": 0.5,
            "sufficient": sufficient,
        },
    )


def run_with(program, verdicts: list[bool], coordinator_finish: str = "length"):
    """Drive a program to the end: coordinator steps produce exactly max_tokens tokens,
    the classifier answers from `verdicts` in order. Returns (steps asked, outcome)."""
    recorded: dict[int, StageRecord] = {}
    asked = []
    verdicts = list(verdicts)
    while True:
        progress = advance(program, recorded)
        if isinstance(progress, Finished):
            return asked, progress.outcome
        for seq, step in progress.steps:
            asked.append(step)
            if isinstance(step, Judge):
                recorded[seq] = judged(seq, verdicts.pop(0))
            elif step.messages == coordinator_messages(QUESTION):  # the insight stream
                text = f"<{step.max_tokens} tokens>"
                recorded[seq] = generated(seq, step, step.max_tokens, text, coordinator_finish)
            else:
                recorded[seq] = generated(seq, step, 7, "So the answer is \\boxed{32}.", "stop")


def test_stage_zero_sufficient_means_executor_alone() -> None:
    asked, outcome = run_with(partial(tandem, QUESTION, JobParams()), [True])
    assert [s.kind for s in asked] == ["classifier", "executor"]
    assert asked[-1].messages == executor_messages(QUESTION, "")
    assert outcome.answer == "32"
    assert outcome.summary == {"stopped_at_stage": 0, "coordinator_tokens": 0}


def test_coordinator_cut_at_each_budget_until_classifier_passes() -> None:
    asked, outcome = run_with(partial(tandem, QUESTION, JobParams()), [False, False, True])
    kinds = [s.kind for s in asked]
    assert kinds == [
        "classifier",
        "coordinator",
        "classifier",
        "coordinator",
        "classifier",
        "executor",
    ]
    coordinator = [s for s in asked if s.kind == "coordinator"]
    # One stream, continued: 100 tokens, then 400 more to reach the 500 budget.
    assert [s.max_tokens for s in coordinator] == [100, 400]
    assert coordinator[0].continuation == ""
    assert coordinator[1].continuation == "<100 tokens>"
    assert all(s.messages == coordinator_messages(QUESTION) for s in coordinator)
    assert "<100 tokens><400 tokens>" in asked[-1].messages[-1]["content"]
    assert outcome.summary == {"stopped_at_stage": 2, "coordinator_tokens": 500}


def test_no_stage_passes_uses_the_last_without_asking_again() -> None:
    asked, outcome = run_with(partial(tandem, QUESTION, JobParams()), [False, False, False])
    judges = [s for s in asked if isinstance(s, Judge)]
    assert [j.stage_index for j in judges] == [0, 1, 2]  # never at the last stage
    assert [s.max_tokens for s in asked if s.kind == "coordinator"] == [100, 400, 500]
    assert outcome.summary["coordinator_tokens"] == 1000
    assert outcome.summary["stopped_at_stage"] == 3


def test_coordinator_finishing_early_goes_straight_to_the_executor() -> None:
    asked, _ = run_with(partial(tandem, QUESTION, JobParams()), [False], coordinator_finish="stop")
    assert [s.kind for s in asked] == ["classifier", "coordinator", "executor"]


def test_judge_sees_the_hint_so_far() -> None:
    asked, _ = run_with(partial(tandem, QUESTION, JobParams()), [False, True])
    second = [s for s in asked if isinstance(s, Judge)][1]
    assert (second.stage_index, second.budget, second.hint) == (1, 100, "<100 tokens>")
    assert classifier_text(QUESTION, second.hint).endswith("Hint: <100 tokens>\n\nAnswer:")
    assert "Hint" not in classifier_text(QUESTION, "")


def test_fixed_budget_never_asks_the_classifier() -> None:
    request = JobRequest(question=QUESTION, strategy="fixed:100")
    asked, _ = run_with(program_for(request), [])
    assert [(s.kind, getattr(s, "max_tokens", None)) for s in asked] == [
        ("coordinator", 100),
        ("executor", 512),
    ]


@pytest.mark.parametrize(
    ("strategy", "role"), [("llm_only", "coordinator"), ("slm_only", "executor")]
)
def test_baselines_are_one_model_alone(strategy: str, role: str) -> None:
    asked, outcome = run_with(program_for(JobRequest(question=QUESTION, strategy=strategy)), [])
    assert [(s.kind, s.role) for s in asked] == [(role, role)]
    assert outcome.answer == "32"


def test_replay_resumes_where_the_records_stop() -> None:
    program = partial(tandem, QUESTION, JobParams())
    first = advance(program, {})
    assert isinstance(first, Pending) and first.steps[0][0] == 0 and first.group == (0,)
    recorded = {0: judged(0, False)}
    second = advance(program, recorded)
    assert isinstance(second, Pending)
    ((seq, step),) = second.steps
    assert seq == 1 and step.kind == "coordinator" and step.max_tokens == 100


def test_replay_rejects_a_record_of_another_kind() -> None:
    program = partial(tandem, QUESTION, JobParams())
    wrong = StageRecord(seq=0, kind="executor", role="executor", model="m")
    with pytest.raises(ReplayMismatch):
        advance(program, {0: wrong})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"question": "   "}, "question is empty"),
        ({"question": "q", "strategy": "magic"}, "unknown strategy"),
        ({"question": "q", "strategy": "fixed:-1"}, "unknown strategy"),
        ({"question": "q", "params": {"budgets": [0, 500, 100]}}, "strictly increasing"),
        ({"question": "q", "params": {"budgets": []}}, "between 1 and 8"),
        ({"question": "q", "params": {"budgets": [-5]}}, "greater than or equal to 0"),
        ({"question": "q", "params": {"nope": 1}}, "params.nope: unknown field"),
        ({"question": "q", "extra": 1}, "extra: unknown field"),
        ({"question": 7}, "question: Input should be a valid string"),
        ({"question": "q", "params": {"cost_preference": "cheap"}}, "cost_preference"),
        ({"question": "x" * 9000}, "limit is 8000"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_requests_name_the_problem(data: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_job_request(data, max_question_chars=8000)


def test_good_request_round_trips() -> None:
    request = parse_job_request(
        {
            "question": "q",
            "strategy": "fixed:250",
            "params": {"budgets": [0, 50], "cost_preference": 0.3},
        },
        8000,
    )
    assert request.params.budgets == (0, 50) and request.params.cost_preference == 0.3
