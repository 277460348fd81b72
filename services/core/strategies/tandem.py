"""Tandem: the coordinator writes the first insights, the classifier decides when they are
enough, the executor finishes (tandem.md).

The coordinator's reply is one stream cut at nested budgets (default 0, 100, 500, 1000
coordinator tokens). At each stage the classifier is asked whether the insights so far are
sufficient; the first stage that passes wins and the executor answers with that prefix. No
classifier is consulted at the last stage (it would be used whatever it said), nor once the
coordinator has finished its insights before the budget (there is nothing more to wait for).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.core.params import JobParams
from services.core.steps import Generate, Judge, StageRecord
from services.core.tasks import job_task
from services.core.workflow import Program


@dataclass(frozen=True)
class CoordinatorStream:
    """The coordinator's stream so far, and how it is cut at the next budget. The classifier's
    training data (`classifier.collect`) grows its streams with these same two methods, so
    its stages are exactly the ones a Tandem run would see."""

    text: str = ""  # the insights
    tokens: int = 0  # coordinator tokens in it, counted by the coordinator model
    finished: bool = False  # the coordinator ended its insights on its own

    def continue_to(
        self, question: str, params: JobParams, stage: int, budget: int
    ) -> Generate | None:
        """The step that continues the stream to `budget` tokens (prefix-cached), or None
        when it is there already or has finished."""
        if budget <= self.tokens or self.finished:
            return None
        return Generate(
            role="coordinator",
            kind="coordinator",
            messages=job_task(question, params).coordinator_messages(),
            continuation=self.text,
            max_tokens=budget - self.tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            note=f"stage {stage}: insights to {budget} tokens",
        )

    def extended(self, record: StageRecord) -> CoordinatorStream:
        """The stream after the segment `record` generated."""
        return CoordinatorStream(
            self.text + record.text,
            self.tokens + record.generated_tokens,
            record.finish_reason == "stop",
        )


def tandem(question: str, params: JobParams) -> Program:
    stream = CoordinatorStream()
    last = len(params.budgets) - 1

    for stage, budget in enumerate(params.budgets):
        segment = stream.continue_to(question, params, stage, budget)
        if segment is not None:
            stream = stream.extended((yield segment))

        if stage == last or stream.finished:
            break
        verdict = yield Judge(
            question=question,
            hint=stream.text,
            stage_index=stage,
            budget=budget,
            note=f"stage {stage}: enough after {stream.tokens} tokens?",
        )
        if verdict.output["sufficient"]:
            break

    answer = yield executor_step(
        question,
        stream.text,
        params,
        note=f"answer with stage {stage} insights ({stream.tokens} tokens)",
    )
    return job_task(question, params).outcome(
        answer.text, summary={"stopped_at_stage": stage, "coordinator_tokens": stream.tokens}
    )


def executor_step(question: str, insights: str, params: JobParams, note: str = "") -> Generate:
    """The executor answering with the insights so far (the classifier's labels come from
    exactly this step)."""
    return Generate(
        role="executor",
        kind="executor",
        messages=job_task(question, params).executor_messages(insights),
        max_tokens=params.executor_max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        note=note,
    )


def fixed(question: str, params: JobParams, budget: int) -> Program:
    """Always stop the coordinator at `budget` tokens: Tandem with a single stage."""
    return tandem(question, params.model_copy(update={"budgets": (budget,)}))
