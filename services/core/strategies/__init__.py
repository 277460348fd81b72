"""The strategy registry: a strategy's name plus a job's input give the program to drive.

Every strategy is a generator of steps (see `services.core.workflow`). `REGISTRY` is the
one list of them; `STRATEGIES` (what requests accept and errors list) is derived from it,
plus the `fixed:N` family (Tandem with a single stage of N coordinator tokens).

Every strategy works with every task type (`params.task`: math, code, text): it takes its
prompts and its answer extraction from `services.core.tasks.job_task`, never from the task
name itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from services.core.params import JobParams
from services.core.strategies.baselines import llm_only, slm_only
from services.core.strategies.relay import relay
from services.core.strategies.scot import scot
from services.core.strategies.tandem import fixed, tandem
from services.core.workflow import Program, ProgramFactory

if TYPE_CHECKING:
    from services.core.requests import JobRequest

StrategyFn = Callable[[str, JobParams], Program]

REGISTRY: dict[str, StrategyFn] = {
    "tandem": tandem,
    "llm_only": llm_only,
    "slm_only": slm_only,
    "scot": scot,
    "relay": relay,
}
FIXED_FAMILY = "fixed:N"
STRATEGIES = (*REGISTRY, FIXED_FAMILY)
_FIXED = re.compile(r"^fixed:(\d{1,6})$")


def fixed_budget(strategy: str) -> int | None:
    """N for a `fixed:N` strategy name, else None."""
    match = _FIXED.match(strategy)
    return int(match.group(1)) if match else None


def is_strategy(name: str) -> bool:
    return name in REGISTRY or fixed_budget(name) is not None


def program_for(request: JobRequest) -> ProgramFactory:
    budget = fixed_budget(request.strategy)
    if budget is not None:
        return partial(fixed, request.question, request.params, budget)
    try:
        strategy = REGISTRY[request.strategy]
    except KeyError:
        raise ValueError(f"strategy {request.strategy!r} is not available") from None
    return partial(strategy, request.question, request.params)
