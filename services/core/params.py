"""A job's parameters (budgets, operating point, sampling, per-strategy knobs), validated
in one place. `services.core.requests` wraps them with the question and the strategy name
into the `JobRequest` that the CLI, the REST API and batch lines all build.

Types are strict: an integer parameter takes only a JSON integer (not true, 5.0 or "5"), a
number parameter an integer or a finite number (not a boolean or a string), so what a
client sends is what the job runs with."""

from __future__ import annotations

import itertools
import keyword
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.core.sufficiency import PRESETS

MAX_STAGES = 8
MAX_TOKENS_LIMIT = 32768


Int = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True)]  # strict floats still take integers
TokenCount = Annotated[Int, Field(ge=1, le=MAX_TOKENS_LIMIT)]


class JobParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    budgets: tuple[Annotated[Int, Field(ge=0, le=MAX_TOKENS_LIMIT)], ...] = (0, 100, 500, 1000)
    cost_preference: (
        Literal["quality", "balanced", "economy"] | Annotated[Number, Field(ge=0, le=1e6)]
    ) = "balanced"
    policy: Literal["entropy", "trained"] | None = None  # None: trained if configured
    executor_max_tokens: TokenCount = 512
    llm_max_tokens: TokenCount = 1024
    temperature: Annotated[Number, Field(ge=0, le=2)] = 0.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    # Engines take an unsigned 32-bit seed (SCoT adds the draft index to it).
    seed: Annotated[Int, Field(ge=0, le=2**32 - 9)] | None = None
    # scot
    # At most 8 drafts: the selection reads one token, so the choices 1..drafts+1 must be
    # single digits.
    drafts: Annotated[Int, Field(ge=1, le=8)] = 5
    draft_max_tokens: TokenCount = 512
    # relay
    relay_mode: Literal["command", "entropy"] = "entropy"  # entropy: training-free trigger
    relay_budget: TokenCount = 1024
    relay_turns: Annotated[Int, Field(ge=1, le=64)] = 5
    relay_call_tokens: TokenCount = 16
    relay_entropy_threshold: Annotated[Number, Field(gt=0, le=20)] = 2.5
    # What kind of answer the job wants (services/core/tasks.py): `math` (a \boxed{} answer),
    # `code` (one Python function; `entry_point` names it, else the question's last `def`)
    # or `text` (free-form: the final text is the answer).
    task: Literal["math", "code", "text"] = "math"
    entry_point: Annotated[str, Field(strict=True, min_length=1, max_length=200)] | None = None

    @field_validator("budgets")
    @classmethod
    def _budgets_increasing(cls, budgets: tuple[int, ...]) -> tuple[int, ...]:
        if not 1 <= len(budgets) <= MAX_STAGES:
            raise ValueError(f"give between 1 and {MAX_STAGES} budgets")
        if any(later <= earlier for earlier, later in itertools.pairwise(budgets)):
            raise ValueError("budgets must be strictly increasing, e.g. [0, 100, 500, 1000]")
        return budgets

    @field_validator("entry_point")
    @classmethod
    def _entry_point_identifier(cls, entry_point: str | None) -> str | None:
        if entry_point is not None and (
            not entry_point.isidentifier() or keyword.iskeyword(entry_point)
        ):
            raise ValueError(f"{entry_point!r} is not a Python function name")
        return entry_point

    @model_validator(mode="after")
    def _entry_point_for_code(self) -> JobParams:
        if self.entry_point is not None and self.task != "code":
            raise ValueError(f"entry_point is for task 'code' (this job's task is {self.task!r})")
        return self


__all__ = ["MAX_STAGES", "MAX_TOKENS_LIMIT", "PRESETS", "JobParams"]
