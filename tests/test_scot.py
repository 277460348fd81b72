"""SCoT: drafts in one parallel group, the selection read from top-k log-probs (invalid
choices fall back to rejecting), accept and reject paths (hand-made records), and one real
embedded run with the default model whose stage costs add up to the job's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import pytest

from services.core.params import JobParams
from services.core.prompts import SELECTION_CUE, selection_messages, solver_messages
from services.core.requests import InvalidRequest, JobRequest, parse_job_request
from services.core.steps import Generate, StageRecord
from services.core.strategies import program_for
from services.core.strategies.scot import (
    DRAFT_TEMPERATURE,
    END_OF_THINKING,
    draft_prefix,
    read_selection,
    scot,
)
from services.core.workflow import Finished, advance

QUESTION = "A box holds 3 red and 5 blue marbles. How many marbles are in 4 boxes?"
DRAFTS = ["8 per box, 4 boxes: 32.", "3 + 5 = 9, so 36.", "I think 12."]


def record(seq: int, step: Generate, text: str, finish: str = "length", **output) -> StageRecord:
    return StageRecord(
        seq=seq,
        kind=step.kind,
        role=step.role,
        model="m",
        generated_tokens=max(1, len(text.split())),
        output={"text": text, "finish_reason": finish, **output},
    )


def selection(top: dict[str, float], text: str | None = None) -> StageRecord:
    text = text if text is not None else max(top, key=top.__getitem__, default="")
    tokens = [{"text": text, "logprob": top.get(text, -9.0), "entropy": 1.0, "top": top}]
    return StageRecord(
        seq=3, kind="select", role="coordinator", model="m", output={"text": text, "tokens": tokens}
    )


Answer = Callable[[int, Generate], StageRecord]


def drive(program, answer: Answer) -> tuple[list[list[Generate]], object]:
    """Run a program to the end; `answer` makes each record. Returns (groups asked, outcome)."""
    recorded: dict[int, StageRecord] = {}
    groups = []
    while True:
        progress = advance(program, recorded)
        if isinstance(progress, Finished):
            return groups, progress.outcome
        groups.append([step for _, step in progress.steps])
        for seq, step in progress.steps:
            recorded[seq] = answer(seq, step)


def answering(choice_top: dict[str, float]) -> Answer:
    def answer(seq: int, step: Generate) -> StageRecord:
        if step.kind == "draft":
            return record(seq, step, DRAFTS[seq], "stop" if seq == 0 else "length")
        if step.kind == "select":
            return selection(choice_top)
        return record(seq, step, "So the answer is \\boxed{32}.", "stop")

    return answer


PARAMS = JobParams(drafts=3, draft_max_tokens=16, llm_max_tokens=32, seed=7)


def test_drafts_are_one_parallel_group_with_distinct_seeds() -> None:
    groups, _ = drive(partial(scot, QUESTION, PARAMS), answering({"1": -0.1}))
    drafts = groups[0]
    assert [s.kind for s in drafts] == ["draft"] * 3 and all(s.role == "executor" for s in drafts)
    assert [s.seed for s in drafts] == [7, 8, 9]
    assert {s.temperature for s in drafts} == {DRAFT_TEMPERATURE}
    assert all(s.stop == (END_OF_THINKING,) and s.max_tokens == 16 for s in drafts)
    assert all(s.messages == solver_messages(QUESTION) for s in drafts)
    (select,) = groups[1]
    assert (select.role, select.max_tokens, select.top_logprobs) == ("coordinator", 1, 20)
    assert select.continuation == SELECTION_CUE
    prompt = select.messages[-1]["content"]
    assert all(f"Reason {k}: {d}" in prompt for k, d in enumerate(DRAFTS, start=1))
    assert "Reason 4: All reasoning paths above are wrong." in prompt


def test_accepted_draft_is_continued_by_the_coordinator() -> None:
    # The greedy token is "9" (not an option); the best valid option is 2.
    top = {"9": -0.2, "2": -1.0, "1": -1.5, " 4": -2.0, "The": -3.0}
    groups, outcome = drive(partial(scot, QUESTION, PARAMS), answering(top))
    (finish,) = groups[2]
    assert (finish.kind, finish.role, finish.temperature) == ("finish", "coordinator", 0.0)
    assert finish.messages == solver_messages(QUESTION)
    assert finish.continuation == DRAFTS[1]  # cut at its length cap: continued as it stands
    assert outcome.answer == "32"
    assert outcome.final_text == DRAFTS[1] + "So the answer is \\boxed{32}."
    assert outcome.summary["selected"] == 2 and outcome.summary["rejected"] is False
    assert outcome.summary["choice_logprob"] == -1.0


def test_a_draft_that_ended_on_its_own_gets_the_end_of_thinking_marker() -> None:
    groups, _ = drive(partial(scot, QUESTION, PARAMS), answering({"1": -0.1}))
    assert groups[2][0].continuation == f"{DRAFTS[0]}\n{END_OF_THINKING}\n\n"


def test_reject_option_makes_the_coordinator_solve_alone() -> None:
    groups, outcome = drive(partial(scot, QUESTION, PARAMS), answering({"4": -0.3, "1": -2.0}))
    (solve,) = groups[2]
    assert (solve.kind, solve.role, solve.continuation) == ("solve", "coordinator", "")
    assert solve.messages == solver_messages(QUESTION) and solve.max_tokens == 32
    assert outcome.summary["selected"] is None and outcome.summary["rejected"] is True
    assert outcome.summary["choice"] == 4 and outcome.answer == "32"


@pytest.mark.parametrize(
    ("top", "text", "choice", "reason"),
    [
        ({"3": -0.5, "1": -0.7}, None, 3, "most likely valid option"),
        ({" 2": -0.5, "7": -0.1}, None, 2, "most likely valid option"),  # 7 > n+1: ignored
        ({"7": -0.1, "0": -0.4, "²": -0.5, "The": -1.0}, None, 4, "no option 1..4"),
        ({}, "1", 1, "generated token"),  # an engine with no top-k: read the text
        ({}, "9", 4, "not an option 1..4"),
        ({}, "", 4, "not an option 1..4"),
    ],
)
def test_selection_maps_to_1_to_n_plus_1_and_rejects_anything_else(
    top: dict[str, float], text: str | None, choice: int, reason: str
) -> None:
    verdict = read_selection(selection(top, text), n_drafts=3)
    assert verdict.choice == choice and reason in verdict.reason
    assert verdict.selected == (choice if choice <= 3 else None)


def test_out_of_range_selection_is_recorded_as_a_rejection() -> None:
    _, outcome = drive(partial(scot, QUESTION, PARAMS), answering({"8": -0.1, "Reason": -1.0}))
    assert outcome.summary["rejected"] is True and outcome.summary["choice"] == 4
    assert outcome.summary["selection_reason"] == "no option 1..4 among the top-2"


def test_draft_prefix_closes_only_finished_drafts() -> None:
    step = Generate(role="executor", kind="draft", max_tokens=4)
    assert draft_prefix(record(0, step, "abc ", "stop")) == f"abc\n{END_OF_THINKING}\n\n"
    assert draft_prefix(record(0, step, "abc ", "length")) == "abc "


def test_selection_prompt_lists_every_draft_then_the_reject_option() -> None:
    messages, cue = selection_messages("Q?", ["a", " b "])
    content = messages[-1]["content"]
    assert content.endswith(
        "Reason 1: a\n\nReason 2: b\n\nReason 3: All reasoning paths above are wrong."
    )
    assert cue == SELECTION_CUE


def test_registered_and_drafts_limited_to_single_digit_choices() -> None:
    program = program_for(JobRequest(question=QUESTION, strategy="scot", params=PARAMS))
    groups, _ = drive(program, answering({"1": -0.1}))
    assert [len(g) for g in groups] == [3, 1, 1]
    with pytest.raises(InvalidRequest, match="drafts"):
        parse_job_request({"question": "q", "strategy": "scot", "params": {"drafts": 9}}, 8000)


# --------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def engines() -> Iterator[object]:
    from services.core.engines import Engines
    from services.settings import Settings

    # One thread: on a shared, loaded CPU, llama.cpp's threads wait on each other and two
    # run up to 10x slower than one.
    engines = Engines(Settings(local_max_batch=4, local_context=2048, local_threads=1))
    yield engines
    engines.close()


@pytest.mark.model
def test_embedded_scot_job_with_the_default_model(engines) -> None:
    from services.core.runner import run_job

    params = {"drafts": 3, "draft_max_tokens": 12, "llm_max_tokens": 12, "seed": 1}
    request = parse_job_request({"question": QUESTION, "strategy": "scot", "params": params}, 8000)
    result = run_job(request, engines)

    kinds = [s.kind for s in result.stages]
    assert kinds[:4] == ["draft", "draft", "draft", "select"]
    assert kinds[4] == ("solve" if result.outcome.summary["rejected"] else "finish")
    assert [s.role for s in result.stages] == ["executor"] * 3 + ["coordinator"] * 2
    assert len({s.text for s in result.stages[:3]}) > 1  # distinct seeds, distinct drafts
    select = result.stages[3]
    assert select.generated_tokens == 1 and len(select.output["tokens"][0]["top"]) >= 10
    summary = result.outcome.summary
    assert summary["choice"] in (1, 2, 3, 4) and summary["selection_reason"]
    assert summary["selected"] in (None, 1, 2, 3)
    assert summary["draft_tokens"] == sum(s.generated_tokens for s in result.stages[:3])

    cost = result.cost
    assert cost.generated_tokens == sum(s.generated_tokens for s in result.stages)
    assert cost.tflops == pytest.approx(sum(s.tflops for s in result.stages))
    assert cost.prefill_tflops == pytest.approx(sum(s.prefill_tflops for s in result.stages))
    assert cost.prompt_tokens == sum(s.prompt_tokens for s in result.stages)
    assert all(s.tflops > 0 for s in result.stages)
