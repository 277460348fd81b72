"""Run a job to the end in this process (embedded mode): the same strategies and stage
records as the services, with no queue between the stages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.core.cost import CostTotals, totals
from services.core.engines import Engines
from services.core.execution import execute_group
from services.core.requests import JobRequest
from services.core.steps import Outcome, StageRecord
from services.core.strategies import program_for
from services.core.workflow import Finished, advance


@dataclass
class JobResult:
    request: JobRequest
    outcome: Outcome
    stages: list[StageRecord] = field(default_factory=list)

    @property
    def cost(self) -> CostTotals:
        return totals(self.stages)

    def to_json(self) -> dict[str, Any]:
        return {
            "answer": self.outcome.answer,
            "strategy": self.request.strategy,
            "stages": [stage.to_dict() for stage in self.stages],
            "cost": self.cost.to_dict(),
            "final_text": self.outcome.final_text,
            "summary": self.outcome.summary,
        }


def run_job(
    request: JobRequest,
    engines: Engines,
    on_stage: Callable[[StageRecord], None] | None = None,
) -> JobResult:
    program = program_for(request)
    recorded: dict[int, StageRecord] = {}
    while True:
        progress = advance(program, recorded)
        if isinstance(progress, Finished):
            stages = [recorded[seq] for seq in sorted(recorded)]
            return JobResult(request, progress.outcome, stages)
        for record in execute_group(progress.steps, engines, request.params):
            recorded[record.seq] = record
            if on_stage:
                on_stage(record)
