"""Tandem: the coordinator writes the first insights, the classifier decides when they are
enough, the executor finishes (tandem.md).

The coordinator's reply is one stream cut at nested budgets (default 0, 100, 500, 1000
coordinator tokens). At each stage the classifier is asked whether the insights so far are
sufficient; the first stage that passes wins and the executor answers with that prefix. No
classifier is consulted at the last stage (it would be used whatever it said), nor once the
coordinator has finished its insights before the budget (there is nothing more to wait for).
"""

from __future__ import annotations

from services.core.answers import extract_answer
from services.core.params import JobParams
from services.core.prompts import coordinator_messages, executor_messages
from services.core.steps import Generate, Judge, Outcome
from services.core.workflow import Program


def tandem(question: str, params: JobParams) -> Program:
    insights = ""  # the coordinator's stream so far
    spent = 0  # coordinator tokens in it, counted by the coordinator model
    finished = False  # the coordinator ended its insights on its own
    last = len(params.budgets) - 1

    for stage, budget in enumerate(params.budgets):
        if budget > spent and not finished:
            record = yield Generate(
                role="coordinator",
                kind="coordinator",
                messages=coordinator_messages(question),
                continuation=insights,  # continue the same stream (prefix-cached)
                max_tokens=budget - spent,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
                note=f"stage {stage}: insights to {budget} tokens",
            )
            insights += record.text
            spent += record.generated_tokens
            finished = record.finish_reason == "stop"

        if stage == last or finished:
            break
        verdict = yield Judge(
            question=question,
            hint=insights,
            stage_index=stage,
            budget=budget,
            note=f"stage {stage}: enough after {spent} tokens?",
        )
        if verdict.output["sufficient"]:
            break

    answer = yield executor_step(
        question, insights, params, note=f"answer with stage {stage} insights ({spent} tokens)"
    )
    return Outcome(
        answer=extract_answer(answer.text),
        final_text=answer.text,
        summary={"stopped_at_stage": stage, "coordinator_tokens": spent},
    )


def executor_step(question: str, insights: str, params: JobParams, note: str = "") -> Generate:
    """The executor answering with the insights so far (the classifier's labels come from
    exactly this step)."""
    return Generate(
        role="executor",
        kind="executor",
        messages=executor_messages(question, insights),
        max_tokens=params.executor_max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        note=note,
    )


def fixed(question: str, params: JobParams, budget: int) -> Program:
    """Always stop the coordinator at `budget` tokens: Tandem with a single stage."""
    return tandem(question, params.model_copy(update={"budgets": (budget,)}))
