"""Cost accounting: the paper's TFLOPs metric, plus the prefill cost it leaves out.

Paper (tandem.md): TFLOPs = 2 * (P_llm * llm_generated + P_slm * slm_generated) / 1e12,
generated tokens only. We also record prefill TFLOPs = 2 * P * uncached prompt tokens, so a
fuller cost can be reported beside the paper's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from services.core.steps import StageRecord


def generation_tflops(n_params: int, generated_tokens: int) -> float:
    return 2.0 * n_params * generated_tokens / 1e12


def prefill_tflops(n_params: int, prompt_tokens: int, cached_prompt_tokens: int = 0) -> float:
    return 2.0 * n_params * max(0, prompt_tokens - cached_prompt_tokens) / 1e12


@dataclass
class CostTotals:
    tflops: float = 0.0
    prefill_tflops: float = 0.0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    latency_s: float = 0.0
    generated_by_role: dict[str, int] = field(default_factory=dict)
    generated_by_model: dict[str, int] = field(default_factory=dict)

    def add(self, stage: StageRecord) -> None:
        self.tflops += stage.tflops
        self.prefill_tflops += stage.prefill_tflops
        self.prompt_tokens += stage.prompt_tokens
        self.cached_prompt_tokens += stage.cached_prompt_tokens
        self.generated_tokens += stage.generated_tokens
        self.latency_s += stage.latency_s
        by_role, by_model = self.generated_by_role, self.generated_by_model
        by_role[stage.role] = by_role.get(stage.role, 0) + stage.generated_tokens
        by_model[stage.model] = by_model.get(stage.model, 0) + stage.generated_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def totals(stages: Iterable[StageRecord]) -> CostTotals:
    result = CostTotals()
    for stage in stages:
        result.add(stage)
    return result
