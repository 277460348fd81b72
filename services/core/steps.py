"""What a strategy asks for (a step) and what it gets back (a stage record).

A strategy never calls a model itself: it yields steps and receives their records. That is
what lets the same strategy code run in one process (embedded) or hop between queues
(services), and what makes a stage's record the single source of truth for its cost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from services.core.prompts import Messages

Role = Literal["coordinator", "executor", "classifier"]


@dataclass(frozen=True)
class Generate:
    """Ask the role's model to continue `messages` (rendered with its chat template),
    followed by `continuation` (text the model already wrote), or a raw prompt."""

    role: Literal["coordinator", "executor"]
    kind: str  # recorded stage kind: "coordinator", "executor", "draft", "select", ...
    max_tokens: int
    messages: Messages = ()
    continuation: str = ""
    raw_prompt: str | None = None
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_logprobs: int = 0
    # Stop before the first token whose next-token entropy (nats) exceeds this: the step is
    # streamed and the uncertain token is dropped (finish_reason "entropy"). Relay uses it.
    stop_entropy: float | None = None
    note: str = ""  # shown in the stage table, e.g. "budget 100"


@dataclass(frozen=True)
class Judge:
    """Ask the sufficiency classifier whether the insights so far are enough."""

    question: str
    hint: str
    stage_index: int
    budget: int
    role: Literal["classifier"] = "classifier"
    kind: str = "classifier"
    note: str = ""


Step = Generate | Judge


def step_to_json(step: Step) -> dict[str, Any]:
    """A step as plain JSON (it travels in a queue message)."""
    return {"type": type(step).__name__, **asdict(step)}


def step_from_json(data: dict[str, Any]) -> Step:
    fields = dict(data)
    kind = fields.pop("type", None)
    if kind == "Judge":
        return Judge(**fields)
    if kind == "Generate":
        fields["messages"] = tuple(dict(message) for message in fields.get("messages", ()))
        fields["stop"] = tuple(fields.get("stop", ()))
        return Generate(**fields)
    raise ValueError(f"not a step: type {kind!r}")


@dataclass(frozen=True)
class StageRecord:
    """One executed step: what ran, what it cost, what it produced."""

    seq: int
    kind: str
    role: str
    model: str
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    tflops: float = 0.0  # the paper's metric: generated tokens only
    prefill_tflops: float = 0.0  # uncached prompt tokens (and the classifier's scoring pass)
    latency_s: float = 0.0
    note: str = ""
    # Generate: {"text", "finish_reason", ["tokens"]}; Judge: {"probability", "threshold",
    # "sufficient", "policy", "features"}
    output: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1

    @property
    def text(self) -> str:
        return str(self.output.get("text", ""))

    @property
    def finish_reason(self) -> str | None:
        return self.output.get("finish_reason")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Outcome:
    """What a strategy returns when it is done."""

    answer: str | None
    final_text: str
    summary: dict[str, Any] = field(default_factory=dict)  # e.g. {"stopped_at_stage": 2}
