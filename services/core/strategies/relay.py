"""Relay decoding (relay.md): the executor's small model writes the solution and, at hard
points, hands the pen to the coordinator's large model for a few tokens, then takes it back.

Both models see the same prompt (the problem) and continue the same solution text S, so each
hand-off is a plain continuation of P + S on the other model (prefix-cached by the engines).

When the small model hands over (`params.relay_mode`):
- "command": the model itself asks, writing `<call>N</call>` (relay-trained small models).
  Its step stops at `</call>`; N large-model tokens follow, N = 0 gives the pen straight
  back. A malformed command (no number) is recorded, removed from S, and the small model
  carries on: a service should not fail a whole job over one bad command.
- "entropy" (default, training-free, for off-the-shelf models that never write commands):
  the small model's step stops before the first token whose next-token entropy exceeds
  `relay_entropy_threshold`; that uncertain token is dropped and the large model writes
  `relay_call_tokens` tokens from there instead.

Limits: at most `relay_turns` small-model steps (the last one runs without a hand-off), and
`relay_budget` generated tokens over both models (each step's max tokens is what is left).
The large model's steps have no stop strings; if one ends the sequence, the job is done.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from services.core.params import JobParams
from services.core.steps import Generate, StageRecord
from services.core.tasks import job_task
from services.core.workflow import Program

CALL_CLOSE = "</call>"
ENTROPY_TOP_K = 20  # lets HTTP engines estimate the entropy from top-k log-probs

_COMMAND = re.compile(r"<call>[^<]*</call>")
_CUT_COMMAND = re.compile(r"<call>([^<]*)$")  # a command cut at its `</call>` stop string
_TOKEN_COUNT = re.compile(r"\s*(\d+)\s*")


@dataclass(frozen=True)
class HandOff:
    """What a small-model step asked for: `tokens` from the large model (0: none, go on
    with the small model; None: a malformed command, ignored)."""

    tokens: int | None
    command: str = ""  # as written, `</call>` included (command mode)
    entropy: float | None = None  # the uncertain token's entropy (entropy mode)


def relay(question: str, params: JobParams) -> Program:
    task = job_task(question, params)
    messages = task.solver_messages()
    entropy_mode = params.relay_mode == "entropy"
    solution = ""  # S: continued by both models (the small model also sees its commands)
    spent = 0  # generated tokens over both models
    small_tokens = large_tokens = 0  # tokens each model wrote into the solution
    handoffs: list[dict[str, Any]] = []
    malformed: list[str] = []
    stopped = "budget"
    turn = 0

    for turn in range(1, params.relay_turns + 1):
        if spent >= params.relay_budget:
            break
        may_hand_off = turn < params.relay_turns  # the last turn runs to the end
        small = yield Generate(
            role="executor",
            kind="small",
            messages=messages,
            continuation=solution,
            max_tokens=params.relay_budget - spent,
            stop=(CALL_CLOSE,) if may_hand_off and not entropy_mode else (),
            stop_entropy=params.relay_entropy_threshold if may_hand_off and entropy_mode else None,
            top_logprobs=ENTROPY_TOP_K if may_hand_off and entropy_mode else 0,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            note=f"turn {turn}: small model" + ("" if may_hand_off else ", no hand-off"),
        )
        spent += small.generated_tokens
        small_tokens += small.output.get("kept_tokens", small.generated_tokens)
        text, hand_off = read_small_step(small, params) if may_hand_off else (small.text, None)
        solution += text
        if hand_off is None:  # the small model ended the solution, or ran out of budget
            stopped = "finished" if small.finish_reason == "stop" else "budget"
            break
        if hand_off.tokens is None:
            malformed.append(hand_off.command)
            continue
        if hand_off.tokens == 0:
            handoffs.append({"turn": turn, "requested": 0, "written": 0})
            continue
        if spent >= params.relay_budget:
            break

        large = yield Generate(
            role="coordinator",
            kind="large",
            messages=messages,
            continuation=without_commands(solution),
            max_tokens=min(hand_off.tokens, params.relay_budget - spent),
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            note=f"turn {turn}: large model writes up to {hand_off.tokens} tokens",
        )
        spent += large.generated_tokens
        large_tokens += large.generated_tokens
        solution += large.text
        handoffs.append(
            {"turn": turn, "requested": hand_off.tokens, "written": large.generated_tokens}
            | ({"entropy": hand_off.entropy} if hand_off.entropy is not None else {})
        )
        if large.finish_reason == "stop":  # no stop strings: the large model ended it
            stopped = "large_finished"
            break

    final_text = without_commands(solution)
    written = small_tokens + large_tokens
    summary: dict[str, Any] = {
        "mode": params.relay_mode,
        "turns": turn,
        "stopped": stopped,
        "handoffs": handoffs,
        "malformed_commands": malformed,
        "small_tokens": small_tokens,
        "large_tokens": large_tokens,
        "call_ratio": round(large_tokens / written, 6) if written else 0.0,
        "spent_tokens": spent,
    }
    return task.outcome(final_text, summary)


def read_small_step(record: StageRecord, params: JobParams) -> tuple[str, HandOff | None]:
    """The text a small-model step adds to the solution, and the hand-off it asks for (None
    when it ended the solution or hit its token cap)."""
    if params.relay_mode == "entropy":
        if record.finish_reason != "entropy":
            return record.text, None
        trigger = record.output.get("trigger") or {}
        return record.text, HandOff(params.relay_call_tokens, entropy=trigger.get("entropy"))
    command = read_command(record.text) if record.finish_reason == "stop" else None
    if command is None:  # ended by end-of-sequence (or length): no command pending
        return record.text, None
    text = record.text[: record.text.rindex("<call>")]
    if command.tokens is None:
        return text, command  # malformed: removed from the solution
    return text + command.command, command


def read_command(text: str) -> HandOff | None:
    """The command a step ended with, cut at `</call>` (which the engines leave out of the
    text): `<call>N` with N a whole number >= 0; any other content is malformed."""
    cut = _CUT_COMMAND.search(text)
    if cut is None:
        return None
    command = cut.group(0) + CALL_CLOSE
    number = _TOKEN_COUNT.fullmatch(cut.group(1))
    return HandOff(tokens=int(number.group(1)) if number else None, command=command)


def without_commands(text: str) -> str:
    """The solution as the large model and the reader see it: every command removed."""
    return _CUT_COMMAND.sub("", _COMMAND.sub("", text))

