"""Training: fit the classifier on collected samples, cross-validate it, search the
thresholds of each operating point on out-of-fold probabilities, and write the artifact;
and `evaluate`, the trained cascade on data it was not trained on.

Model (tandem.md): StandardScaler + gradient-boosted trees on (25 features -> executor
correct), one model for all stages, questions whose label is the same at every reached
stage dropped. scikit-learn is imported only here (and by unpickling in `artifact`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from services.core.classifier.artifact import (
    ARTIFACT_KIND,
    SCHEMA_VERSION,
    Artifact,
    computation_of,
    load_artifact,
    report_path,
    save_artifact,
    write_report,
)
from services.core.classifier.cascade import (
    PRESET_FRACTIONS,
    THRESHOLD_STEP,
    OperatingPoint,
    cascade_report,
    operating_points,
)
from services.core.classifier.samples import (
    TEXT_FORMAT,
    Samples,
    TrainingError,
    load_samples,
    sha256_file,
)
from services.core.sufficiency import FEATURE_NAMES, SCORING_MAX_TOKENS

_GBT = {"n_estimators": 100, "max_depth": 5, "learning_rate": 0.1}


def new_model(seed: int = 0) -> Any:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("gbt", GradientBoostingClassifier(random_state=seed, **_GBT)),
        ]
    )


@dataclass
class TrainResult:
    model: Any
    points: list[OperatingPoint]
    presets: dict[str, float]
    cost_scale: float
    report: dict[str, Any]


def _rows(samples: Samples, questions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training rows of the given questions: every reached stage."""
    mask = samples.reached[questions]
    x = samples.features[questions][mask]
    y = samples.correct[questions][mask].astype(int)
    groups = np.repeat(questions, mask.sum(axis=1))
    return x, y, groups


def train(samples: Samples, folds: int = 5, seed: int = 0) -> TrainResult:
    """Fit the classifier, cross-validate it, and search thresholds per lambda.

    Thresholds are searched on out-of-fold probabilities (each kept question scored by a
    model that did not see it; dropped questions, which no model trains on, by the final
    model), so they are tuned for questions the classifier has not seen rather than for
    its own, over-confident, training fit.
    """
    _check_features(samples)
    kept = np.flatnonzero(samples.kept())
    if len(kept) < 2:
        raise TrainingError(
            f"only {len(kept)} of {samples.n} questions have an executor answer that is right "
            "at some stages and wrong at others; collect more questions (or easier ones, or "
            "a longer --executor-max-tokens) so that at least 2 do"
        )
    x, y, _ = _rows(samples, kept)
    model = new_model(seed).fit(x, y)
    probs = _probabilities(model, samples.features)
    oof, cv = _cross_validate(samples, kept, min(folds, len(kept)), seed)
    probs[kept] = oof
    cost_scale = float(samples.cost[:, -1].mean()) or 1.0
    points = operating_points(probs, samples.correct, samples.cost, cost_scale)
    presets = {name: f / cost_scale for name, f in PRESET_FRACTIONS.items()}
    report = cascade_report(samples, probs, points, presets)
    report["classifier"] = cv | {
        "questions": samples.n,
        "questions_kept": len(kept),
        "rows": len(y),
        "positive_rate": float(y.mean()),
    }
    return TrainResult(model, points, presets, cost_scale, report)


def _check_features(samples: Samples) -> None:
    if samples.features.shape[-1] != len(FEATURE_NAMES):
        raise TrainingError(
            f"samples have {samples.features.shape[-1]} features, this code {len(FEATURE_NAMES)}: "
            "collect again with this version"
        )


def _probabilities(model: Any, features: np.ndarray) -> np.ndarray:
    """P(executor correct) for an (N, S, F) feature array, as (N, S)."""
    n, s, f = features.shape
    return model.predict_proba(features.reshape(n * s, f))[:, 1].reshape(n, s)


def _cross_validate(
    samples: Samples, kept: np.ndarray, folds: int, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Out-of-fold probabilities of the kept questions (GroupKFold by question), and the
    classifier's accuracy (at 0.5) and AUC over their reached stages."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    oof = np.zeros((len(kept), samples.features.shape[1]))
    for train_idx, test_idx in GroupKFold(n_splits=folds).split(kept, groups=kept):
        x, y, _ = _rows(samples, kept[train_idx])
        model = new_model(seed).fit(x, y)
        oof[test_idx] = _probabilities(model, samples.features[kept[test_idx]])
    mask = samples.reached[kept]
    truth = samples.correct[kept][mask]
    predicted = oof[mask]
    auc = float(roc_auc_score(truth, predicted)) if 0 < truth.sum() < truth.size else None
    return oof, {
        "evaluated_on": f"{folds}-fold GroupKFold by question, out-of-fold",
        "accuracy": float(((predicted >= 0.5) == truth).mean()),
        "auc": auc,
    }


def evaluate(artifact: Artifact, samples: Samples) -> dict[str, Any]:
    """The trained cascade on data it was not trained on (a transfer check)."""
    from sklearn.metrics import roc_auc_score

    _check_features(samples)
    probs = _probabilities(artifact.model, samples.features)
    points = [_fit_thresholds(p, len(samples.budgets)) for p in artifact.points]
    report = cascade_report(samples, probs, points, artifact.presets)
    truth, predicted = samples.correct[samples.reached], probs[samples.reached]
    report["classifier"] = {
        "questions": samples.n,
        "questions_kept": int(samples.kept().sum()),
        "rows": int(truth.size),
        "positive_rate": float(truth.mean()),
        "evaluated_on": "data the classifier was not trained on (all reached stages)",
        "accuracy": float(((predicted >= 0.5) == truth).mean()),
        "auc": float(roc_auc_score(truth, predicted)) if 0 < truth.sum() < truth.size else None,
    }
    warnings = []
    if tuple(samples.budgets) != tuple(artifact.budgets):
        warnings.append(
            f"data budgets {list(samples.budgets)} differ from the artifact's "
            f"{list(artifact.budgets)}: thresholds applied by stage index"
        )
    if computation_of(samples.exact) != artifact.computation:
        warnings.append(
            f"the data's features are {computation_of(samples.exact)}, the artifact was "
            f"trained on {artifact.computation} features: a worker would refuse to serve it so"
        )
    if warnings:
        report["warning"] = "; ".join(warnings)
    return report


def _fit_thresholds(point: OperatingPoint, n_stages: int) -> OperatingPoint:
    """Thresholds by stage index for a cascade of n_stages (missing stages: always stop)."""
    ts = [*point.thresholds[: n_stages - 1], *([0.0] * n_stages)][:n_stages]
    return OperatingPoint(
        point.lam, point.fraction, tuple(ts), point.accuracy, point.tflops, point.stop_share
    )


def build_manifest(result: TrainResult, samples: Samples, seed: int) -> dict[str, Any]:
    import sklearn

    meta = samples.meta
    return {
        "kind": ARTIFACT_KIND,
        "schema_version": SCHEMA_VERSION,
        "features": {
            "names": list(FEATURE_NAMES),
            "count": len(FEATURE_NAMES),
            "text_format": TEXT_FORMAT,
            "max_tokens": SCORING_MAX_TOKENS,
            "feature_model": meta.get("models", {}).get("feature", {}).get("name"),
            "exact": samples.exact,
            "computation": computation_of(samples.exact),
        },
        "model": {"type": "StandardScaler+GradientBoostingClassifier", **_GBT, "seed": seed},
        "budgets": list(samples.budgets),
        "cost_scale_tflops": result.cost_scale,
        "lambda_unit": "accuracy per TFLOP (paper metric: generated tokens only)",
        "presets": result.presets,
        "preset_fractions": PRESET_FRACTIONS,
        "operating_points": [p.to_dict() for p in result.points],
        "threshold_step": THRESHOLD_STEP,
        "report": result.report,
        "provenance": {
            "data": str(samples.source.resolve()) if samples.source else None,
            "data_sha256": sha256_file(samples.source) if samples.source else None,
            "task": meta.get("task", "math"),
            "dataset": meta.get("dataset"),
            "dataset_sha256": meta.get("dataset_sha256"),
            "models": meta.get("models"),
            "executor_max_tokens": meta.get("executor_max_tokens"),
            "questions": samples.n,
            "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "sklearn_version": sklearn.__version__,
            "numpy_version": np.__version__,
        },
    }


def train_artifact(data: Path, out: Path, folds: int = 5, seed: int = 0) -> tuple[Artifact, dict]:
    """Train on collected data and write the artifact and its report (`<out>.report.json`)."""
    samples = load_samples(data)
    result = train(samples, folds=folds, seed=seed)
    manifest = build_manifest(result, samples, seed)
    save_artifact(out, result.model, manifest)
    write_report(report_path(out), result.report)
    return load_artifact(out), result.report
