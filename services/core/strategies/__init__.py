"""Strategy registry: a strategy name plus a job's input gives a program to drive.

Every strategy works with every task type (`params.task`: math, code, text): it takes its
prompts and its answer extraction from `services.core.tasks.job_task`, never from the task
name itself."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from services.core.params import JobParams, JobRequest, fixed_budget
from services.core.strategies.baselines import llm_only, slm_only
from services.core.strategies.tandem import fixed, tandem
from services.core.workflow import Program, ProgramFactory

StrategyFn = Callable[[str, JobParams], Program]

REGISTRY: dict[str, StrategyFn] = {
    "tandem": tandem,
    "llm_only": llm_only,
    "slm_only": slm_only,
}


def register(name: str, strategy: StrategyFn) -> None:
    REGISTRY[name] = strategy


def program_for(request: JobRequest) -> ProgramFactory:
    budget = fixed_budget(request.strategy)
    if budget is not None:
        return partial(fixed, request.question, request.params, budget)
    if request.strategy not in REGISTRY:
        _load_optional()
    try:
        strategy = REGISTRY[request.strategy]
    except KeyError:
        raise ValueError(f"strategy {request.strategy!r} is not available") from None
    return partial(strategy, request.question, request.params)


def _load_optional() -> None:
    """Strategies in their own modules register themselves when imported."""
    from services.optional import present

    for _module in present("services.core.strategies.scot", "services.core.strategies.relay"):
        pass
