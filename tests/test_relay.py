"""Relay decoding: command parsing (with, without and with a malformed number), hand-offs,
turn and budget limits, the call ratio (hand-made records), and with the real default
model the entropy trigger and one embedded job whose stage costs add up to the job's."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from services.core.params import JobParams
from services.core.prompts import solver_messages
from services.core.requests import JobRequest, parse_job_request
from services.core.steps import Generate, StageRecord
from services.core.strategies import program_for
from services.core.strategies.relay import (
    CALL_CLOSE,
    ENTROPY_TOP_K,
    read_command,
    relay,
    without_commands,
)
from services.core.workflow import Finished, advance

QUESTION = "A box holds 3 red and 5 blue marbles. How many marbles are in 4 boxes?"
COMMAND = JobParams(relay_mode="command", relay_budget=100, relay_turns=5)


def drive(program, script: list[tuple[str, str, int, dict[str, Any]]]):
    """Answer the program's steps in order from `script` ((text, finish, tokens, extra
    output) per step). Returns (steps asked, outcome); the script must be used up."""
    recorded: dict[int, StageRecord] = {}
    asked: list[Generate] = []
    script = list(script)
    while True:
        progress = advance(program, recorded)
        if isinstance(progress, Finished):
            assert not script, f"steps not asked for: {script}"
            return asked, progress.outcome
        ((seq, step),) = progress.steps
        asked.append(step)
        text, finish, tokens, extra = script.pop(0)
        recorded[seq] = StageRecord(
            seq=seq,
            kind=step.kind,
            role=step.role,
            model="m",
            generated_tokens=tokens,
            output={"text": text, "finish_reason": finish, **extra},
        )


def step(text: str, finish: str, tokens: int, **extra: Any) -> tuple[str, str, int, dict]:
    return (text, finish, tokens, extra)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Half of 48 is <call>5", 5),
        ("x <call> 12 ", 12),
        ("<call>0", 0),
        ("<call>", None),  # no number: malformed
        ("<call>many", None),
        ("<call>-3", None),
        ("<call>2.5", None),
    ],
)
def test_command_parsing(text: str, tokens: int | None) -> None:
    command = read_command(text)
    assert command is not None and command.tokens == tokens
    assert command.command == text[text.index("<call>") :] + CALL_CLOSE


@pytest.mark.parametrize("text", ["no command here", "<call>3</call> done", ""])
def test_text_without_a_pending_command(text: str) -> None:
    assert read_command(text) is None


def test_commands_are_removed_for_the_large_model_and_the_reader() -> None:
    assert without_commands("a<call>3</call>b<call>x</call>c<call>7") == "abc"


def test_command_mode_hands_off_n_tokens_and_takes_the_pen_back() -> None:
    asked, outcome = drive(
        partial(relay, QUESTION, COMMAND),
        [
            step("Step one <call>3", "stop", 5),  # stopped at </call>
            step(" big", "length", 3),  # the large model's 3 tokens
            step(" more <call>0", "stop", 4),  # N = 0: straight back to the small model
            step(" x <call>many", "stop", 4),  # malformed: recorded, removed, carry on
            step(" so \\boxed{32}", "stop", 6),  # end of sequence: done
        ],
    )
    assert [(s.kind, s.role) for s in asked] == [
        ("small", "executor"),
        ("large", "coordinator"),
    ] + [("small", "executor")] * 3
    small, large = asked[0], asked[1]
    assert small.stop == (CALL_CLOSE,) and small.stop_entropy is None
    assert small.messages == large.messages == solver_messages(QUESTION)
    assert (large.max_tokens, large.continuation, large.stop) == (3, "Step one ", ())
    # The small model sees its own commands; the malformed one is gone.
    assert asked[2].continuation == "Step one <call>3</call> big"
    assert asked[3].continuation == "Step one <call>3</call> big more <call>0</call>"
    assert asked[4].continuation == "Step one <call>3</call> big more <call>0</call> x "
    assert [s.max_tokens for s in asked] == [100, 3, 92, 88, 84]  # small: the budget left
    assert outcome.final_text == "Step one  big more  x  so \\boxed{32}"
    assert outcome.answer == "32"
    summary = outcome.summary
    assert summary["handoffs"] == [
        {"turn": 1, "requested": 3, "written": 3},
        {"turn": 2, "requested": 0, "written": 0},
    ]
    assert summary["malformed_commands"] == ["<call>many</call>"]
    assert (summary["stopped"], summary["turns"], summary["spent_tokens"]) == ("finished", 4, 22)
    assert (summary["small_tokens"], summary["large_tokens"]) == (19, 3)
    assert summary["call_ratio"] == pytest.approx(3 / 22, abs=1e-6)


def test_last_turn_runs_without_hand_off() -> None:
    params = COMMAND.model_copy(update={"relay_turns": 2})
    asked, outcome = drive(
        partial(relay, QUESTION, params),
        [
            step("a <call>2", "stop", 3),
            step(" b", "length", 2),
            step(" c <call>4</call> d", "stop", 6),  # no stop string: the command is just text
        ],
    )
    assert [s.kind for s in asked] == ["small", "large", "small"]
    assert asked[-1].stop == () and "no hand-off" in asked[-1].note
    assert outcome.final_text == "a  b c  d"
    assert outcome.summary["turns"] == 2 and outcome.summary["stopped"] == "finished"


def test_budget_caps_every_step_and_ends_the_job() -> None:
    params = COMMAND.model_copy(update={"relay_budget": 10})
    asked, outcome = drive(
        partial(relay, QUESTION, params),
        [step("a <call>8", "stop", 6), step(" b c d", "length", 4)],
    )
    assert [(s.kind, s.max_tokens) for s in asked] == [("small", 10), ("large", 4)]
    assert outcome.summary["stopped"] == "budget" and outcome.summary["spent_tokens"] == 10


def test_small_model_running_out_of_budget_stops() -> None:
    params = COMMAND.model_copy(update={"relay_budget": 10})
    _, outcome = drive(partial(relay, QUESTION, params), [step("a b c", "length", 10)])
    assert outcome.summary["stopped"] == "budget" and outcome.summary["handoffs"] == []


def test_large_model_ending_the_sequence_ends_the_job() -> None:
    asked, outcome = drive(
        partial(relay, QUESTION, COMMAND),
        [step("a <call>9", "stop", 3), step(" \\boxed{32}", "stop", 5)],
    )
    assert [s.kind for s in asked] == ["small", "large"]
    assert outcome.summary["stopped"] == "large_finished" and outcome.answer == "32"


def test_entropy_mode_hands_off_call_tokens_at_an_uncertain_token() -> None:
    params = JobParams(relay_budget=100, relay_call_tokens=4, relay_entropy_threshold=1.5)
    trigger = {"entropy": 2.0, "threshold": 1.5, "dropped_token": " 9"}
    asked, outcome = drive(
        partial(relay, QUESTION, params),
        [
            step("So 8 times 4 is", "entropy", 5, kept_tokens=4, trigger=trigger),
            step(" 32.", "length", 4),
            step(" \\boxed{32}", "stop", 6),
        ],
    )
    small, large, last = asked
    assert (small.stop_entropy, small.top_logprobs, small.stop) == (1.5, ENTROPY_TOP_K, ())
    assert (large.kind, large.max_tokens, large.continuation) == ("large", 4, "So 8 times 4 is")
    assert last.continuation == "So 8 times 4 is 32." and last.max_tokens == 91
    assert outcome.final_text == "So 8 times 4 is 32. \\boxed{32}"
    summary = outcome.summary
    assert summary["mode"] == "entropy"
    assert summary["handoffs"] == [{"turn": 1, "requested": 4, "written": 4, "entropy": 2.0}]
    # Final tokens: 4 kept + 6 by the small model, 4 by the large one (the dropped token
    # counts as spent, not as written).
    assert (summary["small_tokens"], summary["large_tokens"], summary["spent_tokens"]) == (
        10,
        4,
        15,
    )
    assert summary["call_ratio"] == pytest.approx(4 / 14, abs=1e-6)


def test_entropy_mode_last_turn_has_no_trigger() -> None:
    params = JobParams(relay_turns=1)
    asked, _ = drive(partial(relay, QUESTION, params), [step("x", "stop", 1)])
    assert asked[0].stop_entropy is None and asked[0].top_logprobs == 0


def test_registered_with_entropy_mode_by_default() -> None:
    program = program_for(JobRequest(question=QUESTION, strategy="relay"))
    asked, _ = drive(program, [step("x", "stop", 1)])
    assert asked[0].stop_entropy == JobParams().relay_entropy_threshold


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


def small_step(max_tokens: int, threshold: float | None) -> Generate:
    return Generate(
        role="executor",
        kind="small",
        messages=solver_messages(QUESTION),
        max_tokens=max_tokens,
        stop_entropy=threshold,
        top_logprobs=ENTROPY_TOP_K if threshold is not None else 0,
    )


@pytest.mark.model
def test_entropy_trigger_with_the_default_model(engines) -> None:
    from services.core.execution import execute

    params = JobParams()
    at_once = execute(0, small_step(4, 1e-3), engines, params)
    assert (at_once.finish_reason, at_once.text, at_once.output["kept_tokens"]) == (
        "entropy",
        "",
        0,
    )
    assert at_once.generated_tokens == 1 and at_once.output["trigger"]["entropy"] > 1e-3
    assert at_once.tflops > 0 and at_once.prompt_tokens > 20

    never = execute(1, small_step(4, 20.0), engines, params)
    assert never.finish_reason == "length" and never.output["kept_tokens"] == 4
    assert never.generated_tokens == 4 and "trigger" not in never.output
    plain = execute(2, small_step(4, None), engines, params)  # greedy: the same text
    assert never.text == plain.text and never.prompt_tokens == plain.prompt_tokens


@pytest.mark.model
@pytest.mark.parametrize(
    "params",
    [
        {
            "relay_budget": 20,
            "relay_turns": 3,
            "relay_call_tokens": 3,
            "relay_entropy_threshold": 1e-3,
        },
        {"relay_mode": "command", "relay_budget": 6},
    ],
    ids=["entropy", "command"],
)
def test_embedded_relay_job_with_the_default_model(engines, params: dict) -> None:
    from services.core.runner import run_job

    request = parse_job_request({"question": QUESTION, "strategy": "relay", "params": params}, 8000)
    result = run_job(request, engines)
    stages, summary = result.stages, result.outcome.summary
    if params.get("relay_mode") == "command":  # SmolLM2 writes no commands: one small step
        assert [s.kind for s in stages] == ["small"]
        assert summary["handoffs"] == [] and summary["call_ratio"] == 0.0
    else:  # a threshold of ~0 hands off at once on every turn but the last
        assert [(s.kind, s.role) for s in stages] == [
            ("small", "executor"),
            ("large", "coordinator"),
        ] * 2 + [("small", "executor")]
        assert [s.finish_reason for s in stages[:4]] == ["entropy", "length"] * 2
        assert summary["large_tokens"] == 6 and summary["turns"] == 3
        assert 0 < summary["call_ratio"] <= 1
    assert summary["spent_tokens"] <= params["relay_budget"]
    assert result.outcome.final_text == "".join(s.text for s in stages)

    cost = result.cost
    assert (
        cost.generated_tokens == sum(s.generated_tokens for s in stages) == summary["spent_tokens"]
    )
    assert cost.tflops == pytest.approx(sum(s.tflops for s in stages))
    assert cost.prefill_tflops == pytest.approx(sum(s.prefill_tflops for s in stages))
    assert cost.prompt_tokens == sum(s.prompt_tokens for s in stages)
