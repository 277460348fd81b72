"""The plain baselines: one model answers alone."""

from __future__ import annotations

from services.core.params import JobParams
from services.core.steps import Generate
from services.core.tasks import job_task
from services.core.workflow import Program


def llm_only(question: str, params: JobParams) -> Program:
    """The coordinator's (large) model solves the problem by itself."""
    return (yield from _alone("coordinator", question, params.llm_max_tokens, params))


def slm_only(question: str, params: JobParams) -> Program:
    """The executor's (small) model solves the problem by itself."""
    return (yield from _alone("executor", question, params.executor_max_tokens, params))


def _alone(role: str, question: str, max_tokens: int, params: JobParams) -> Program:
    task = job_task(question, params)
    record = yield Generate(
        role=role,  # type: ignore[arg-type]
        kind=role,
        messages=task.solver_messages(),
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        note=f"{role} answers alone",
    )
    return task.outcome(record.text)
