"""The trained sufficiency policy, as jobs use it: an artifact's model and operating
points behind the `SufficiencyPolicy` interface of `services.core.sufficiency`.

`trained_policy(settings)` is what `Engines` loads for policy "trained";
`check_classifier_artifact(settings)` is what a worker runs at start, so that a missing,
incompatible or wrongly served artifact stops it with one line instead of failing jobs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.core.backends.base import ConfigurationError
from services.core.classifier.artifact import Artifact, check_feature_computation, load_artifact
from services.core.classifier.cascade import OperatingPoint
from services.core.sufficiency import FEATURE_NAMES, CostPreference, Verdict
from services.settings import Settings


class TrainedPolicy:
    """`SufficiencyPolicy` over a trained artifact.

    The operating point: a preset name uses the artifact's own lambda for it (fractions of
    the training cost scale, see cascade.PRESET_FRACTIONS); a numeric lambda (accuracy per
    TFLOP) uses the thresholds of the nearest trained lambda on a log scale (0 is its own
    point; a lambda below half the smallest positive one trained counts as 0). Thresholds
    are per stage index; a stage beyond the trained ones always stops.
    """

    name = "trained"

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        self.model = artifact.model
        self.points = sorted(artifact.points, key=lambda p: p.lam)
        self.presets = artifact.presets

    def point_for(self, preference: CostPreference) -> OperatingPoint:
        if isinstance(preference, str):
            if preference not in self.presets:
                raise ConfigurationError(
                    f"unknown cost preference {preference!r}: use one of "
                    f"{', '.join(self.presets)} or a number (lambda per TFLOP)"
                )
            lam = self.presets[preference]
        else:
            lam = float(preference)
        return min(self.points, key=lambda p: _lambda_distance(lam, p.lam, self.points))

    def probability(self, features: Sequence[float]) -> float:
        if len(features) != len(FEATURE_NAMES):
            raise ConfigurationError(
                f"the trained classifier takes {len(FEATURE_NAMES)} features, got {len(features)}"
            )
        row = np.asarray(features, dtype=np.float64).reshape(1, -1)
        return float(self.model.predict_proba(row)[0, 1])

    def judge(
        self, features: Sequence[float], stage_index: int, preference: CostPreference
    ) -> Verdict:
        probability = self.probability(features)
        thresholds = self.point_for(preference).thresholds
        last = len(thresholds) - 1
        threshold = thresholds[stage_index] if stage_index < last else 0.0
        return Verdict(probability, threshold, probability >= threshold, self.name)


def _lambda_distance(lam: float, trained: float, points: Sequence[OperatingPoint]) -> float:
    smallest = min((p.lam for p in points if p.lam > 0), default=1.0)
    floor = smallest / 2
    a, b = max(lam, 0.0), trained
    if a < floor or b <= 0:
        return 0.0 if (a < floor) == (b <= 0) else math.inf
    return abs(math.log(a / b))


def load_policy(path: Path) -> TrainedPolicy:
    """The trained policy from an artifact, or a ClassifierArtifactError naming the path
    and the fix. Does not look at the settings (see `trained_policy`)."""
    return TrainedPolicy(load_artifact(Path(path)))


def check_classifier_artifact(settings: Settings) -> Artifact | None:
    """The configured artifact, checked, and checked against the configured feature model
    (None when none is configured: policy 'entropy').

    Meant for a worker's start, so that a bad artifact stops it at once with the one-line
    message instead of failing every job later."""
    if not settings.classifier_artifact:
        return None
    artifact = load_artifact(Path(settings.classifier_artifact))
    check_feature_computation(artifact, settings.model("classifier"))
    return artifact


def trained_policy(settings: Settings) -> TrainedPolicy:
    """Policy 'trained' as configured: the checked artifact, or a ConfigurationError."""
    artifact = check_classifier_artifact(settings)
    if artifact is None:
        raise ConfigurationError(
            "policy 'trained' needs a classifier artifact: set TANDEM_CLASSIFIER_ARTIFACT "
            "(train one with `tandem classifier train`) or use policy 'entropy'"
        )
    return TrainedPolicy(artifact)
