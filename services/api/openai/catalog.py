"""Models: every strategy is a model, and Tandem's operating points are models of their own.

    tandem, tandem@quality, tandem@balanced, tandem@economy, tandem@<lambda>
    llm_only, slm_only, scot, relay, fixed:<N>

`tandem` is `tandem@balanced` (the default operating point); `tandem@0.25` takes a number
lambda (accuracy - lambda * TFLOPs). `fixed:N` and number lambdas are accepted on requests
but not listed (they are families). A job's model id is written back the way a request
would name it (`model_of`), so a chat completion, a batch output line and GET /v1/models
agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.api.openai.protocol import ModelObject, ModelTandem, OpenAIError
from services.core.params import JobParams
from services.core.strategies import REGISTRY, STRATEGIES, fixed_budget
from services.core.sufficiency import PRESETS

# Models have no real creation date; a fixed one keeps `created` stable across processes.
CREATED = 1767225600  # 2026-01-01T00:00:00Z
OPERATING_POINT_STRATEGIES = ("tandem",)  # the strategies whose stop decisions read lambda
DEFAULT_PREFERENCE = JobParams().cost_preference

DESCRIPTIONS = {
    "tandem": "the coordinator writes the first insights, the classifier decides when they "
    "are enough, the executor answers",
    "llm_only": "the large model (coordinator) answers alone",
    "slm_only": "the small model (executor) answers alone",
    "scot": "speculative chain-of-thought: small-model drafts, the large model selects and "
    "finishes",
    "relay": "the models take turns, handing over at uncertain tokens",
}


@dataclass(frozen=True)
class ModelChoice:
    id: str
    strategy: str
    cost_preference: str | float | None  # None: the job's default

    def to_object(self) -> ModelObject:
        base = self.strategy.split(":", 1)[0]
        description = DESCRIPTIONS.get(self.strategy) or (
            f"Tandem with a single stage of {fixed_budget(self.strategy)} coordinator tokens"
        )
        if self.cost_preference is not None and base in OPERATING_POINT_STRATEGIES:
            description += f", at the operating point {self.cost_preference}"
        return ModelObject(
            id=self.id,
            created=CREATED,
            tandem=ModelTandem(
                strategy=self.strategy,
                cost_preference=self.cost_preference,
                description=description,
            ),
        )


def listed() -> list[ModelChoice]:
    models = []
    for strategy in REGISTRY:
        models.append(ModelChoice(strategy, strategy, None))
        if strategy in OPERATING_POINT_STRATEGIES:
            models += [ModelChoice(f"{strategy}@{p}", strategy, p) for p in PRESETS]
    return models


def resolve(name: object) -> ModelChoice:
    """The model a request names, or a 404 `model_not_found` listing the models."""
    if not isinstance(name, str) or not name or len(name) > 64:
        raise _unknown(name)
    strategy, at, point = name.partition("@")
    if strategy not in REGISTRY and fixed_budget(strategy) is None:
        raise _unknown(name)
    if not at:
        return ModelChoice(name, strategy, None)
    if strategy not in OPERATING_POINT_STRATEGIES or not point:
        raise _unknown(name)
    if point in PRESETS:
        return ModelChoice(name, strategy, point)
    try:
        value = float(point)
    except ValueError:
        raise _unknown(name) from None
    if not math.isfinite(value) or not 0 <= value <= 1e6:
        raise _unknown(name)
    return ModelChoice(name, strategy, value)


def _unknown(name: object) -> OpenAIError:
    shown = repr(name)[:80]
    return OpenAIError(
        404,
        f"The model {shown} does not exist. Models: {', '.join(m.id for m in listed())}; "
        f"also {STRATEGIES[-1]} (N coordinator tokens) and tandem@<lambda>.",
        param="model",
        code="model_not_found",
    )


def model_of(strategy: str, params: JobParams) -> str:
    """The model id of a job, as a request would name it (tandem@balanced is `tandem`)."""
    if strategy not in OPERATING_POINT_STRATEGIES or params.cost_preference == DEFAULT_PREFERENCE:
        return strategy
    point = params.cost_preference
    if isinstance(point, float):
        point = f"{point:g}"
    return f"{strategy}@{point}"
