"""The sufficiency classifier's contract: features, verdicts, and the training-free default.

Features (tandem.md, 25 numbers) come from one scoring pass of the feature model over
`Question: ...\\n\\nHint: ...\\n\\nAnswer:`. A policy maps them to the probability that the
executor will succeed with the insights so far, and compares it with the stage's threshold
for the job's operating point. The trained policy lives in `services.core.classifier`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.core.backends.base import Scoring

SERIES_STATS = (
    "mean",
    "std",
    "max",
    "min",
    "slope",
    "rising",
    "falling",
    "first_quarter",
    "last_quarter",
    "trend_changes",
)
FEATURE_NAMES: tuple[str, ...] = (
    "perplexity",
    "log_perplexity",
    *(f"entropy_{s}" for s in SERIES_STATS),
    *(f"logprob_{s}" for s in SERIES_STATS),
    "length",
    "stage_index",
    "stage_budget",
)
SCORING_MAX_TOKENS = 1024  # tandem.md: the classifier's text is truncated to 1024 tokens
PRESETS: dict[str, float] = {"quality": 0.0, "balanced": 0.5, "economy": 1.0}
CostPreference = str | float


def series_stats(values: Sequence[float]) -> list[float]:
    """The ten summaries of one per-token series, in SERIES_STATS order."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return [0.0] * len(SERIES_STATS)
    steps = np.diff(x)
    signs = np.sign(steps[steps != 0])
    quarter = max(1, x.size // 4)
    slope = float(np.polyfit(np.arange(x.size), x, 1)[0]) if x.size > 1 else 0.0
    moves = max(1, steps.size)
    return [
        float(x.mean()),
        float(x.std()),
        float(x.max()),
        float(x.min()),
        slope,
        float((steps > 0).sum() / moves),
        float((steps < 0).sum() / moves),
        float(x[:quarter].mean()),
        float(x[-quarter:].mean()),
        float((signs[1:] != signs[:-1]).sum()) if signs.size > 1 else 0.0,
    ]


def features_from_scoring(scoring: Scoring, stage_index: int, stage_budget: int) -> list[float]:
    """The 25 features, in FEATURE_NAMES order."""
    logprobs = scoring.token_logprobs
    log_ppl = -float(np.mean(logprobs)) if logprobs else 0.0
    return [
        math.exp(min(log_ppl, 50.0)),
        log_ppl,
        *series_stats(scoring.entropies),
        *series_stats(logprobs),
        float(scoring.n_tokens),
        float(stage_index),
        float(stage_budget),
    ]


def preference_lambda(preference: CostPreference) -> float:
    """A named preset or a numeric lambda, as the lambda of `accuracy - lambda * cost`."""
    if isinstance(preference, int | float):
        return float(preference)
    return PRESETS[preference]


@dataclass(frozen=True)
class Verdict:
    probability: float
    threshold: float
    sufficient: bool
    policy: str


class SufficiencyPolicy(Protocol):
    name: str

    def judge(
        self, features: Sequence[float], stage_index: int, preference: CostPreference
    ) -> Verdict: ...


class EntropyPolicy:
    """Training-free default: the feature model's confidence over question + hint.

    probability = exp(-log_perplexity / 4): text the executor's model reads with low
    surprise (log-perplexity 1 -> 0.78, 2 -> 0.61, 3 -> 0.47) is taken as a sign that the
    executor can follow it. Thresholds start strict at stage 0 (the question alone) and relax
    with each stage; the operating point shifts them by +0.1 (lambda 0, "quality") to -0.1
    (lambda >= 1, "economy"). Uncalibrated by design: the trained classifier replaces it.
    """

    name = "entropy"
    base_thresholds = (0.85, 0.7, 0.6, 0.5)

    def judge(
        self, features: Sequence[float], stage_index: int, preference: CostPreference
    ) -> Verdict:
        log_ppl = features[FEATURE_NAMES.index("log_perplexity")]
        probability = math.exp(-max(0.0, log_ppl) / 4.0)
        shift = 0.1 - 0.2 * min(max(preference_lambda(preference), 0.0), 1.0)
        base = self.base_thresholds[min(stage_index, len(self.base_thresholds) - 1)]
        threshold = round(min(1.0, max(0.0, base + shift)), 4)
        return Verdict(probability, threshold, probability >= threshold, self.name)
