"""The trained classifier as one file: a zip of `manifest.json` (schema, features, budgets,
operating points, report, provenance; readable without unpickling) and `model.joblib` (the
fitted pipeline), checked against this code before anything is unpickled.

The manifest records which feature computation the classifier was trained on
(`features.computation`): "exact" (full logits rows: the local llama.cpp engine, torch) or
"top-k" (entropies estimated from the top-k log-probs an OpenAI-compatible server returns).
Their features differ by more than questions differ from each other, so an artifact is
served only with the computation it was trained on (`check_feature_computation`).
Artifacts written before that field: the older `features.exact` flag decides, and an
artifact with neither counts as exact.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.core.backends.base import ConfigurationError
from services.core.classifier.cascade import OperatingPoint
from services.core.classifier.samples import TEXT_FORMAT
from services.core.sufficiency import FEATURE_NAMES, SCORING_MAX_TOKENS
from services.settings import ModelSettings

ARTIFACT_KIND = "tandem-sufficiency-classifier"
SCHEMA_VERSION = 1
# The feature computation of each feature backend (TANDEM_FEATURE_BACKEND): llama.cpp and
# torch read full logits rows; an OpenAI-compatible server ("sglang") returns top-k
# log-probs only, so its entropies are estimates (backends.base.entropy_from_top_k).
COMPUTATION_OF_BACKEND: dict[str, str] = {"local": "exact", "torch": "exact", "sglang": "top-k"}
COMPUTATIONS = ("exact", "top-k")


class ClassifierArtifactError(ConfigurationError):
    """A classifier artifact is missing, corrupt or incompatible with this code."""


def _artifact_error(path: Path | str, problem: str) -> ClassifierArtifactError:
    return ClassifierArtifactError(
        f"classifier artifact {path}: {problem}; retrain it with `tandem classifier train "
        f"--data DIR --out {path}`, or unset TANDEM_CLASSIFIER_ARTIFACT to use policy 'entropy'"
    )


def computation_of(exact: bool) -> str:
    return "exact" if exact else "top-k"


@dataclass
class Artifact:
    model: Any
    manifest: dict[str, Any]
    path: Path | None = None

    @property
    def points(self) -> list[OperatingPoint]:
        return [OperatingPoint.from_dict(p) for p in self.manifest["operating_points"]]

    @property
    def presets(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.manifest["presets"].items()}

    @property
    def budgets(self) -> tuple[int, ...]:
        return tuple(self.manifest["budgets"])

    @property
    def computation(self) -> str:
        return trained_computation(self.manifest)


def trained_computation(manifest: dict[str, Any]) -> str:
    """The feature computation an artifact was trained on (see the module docstring)."""
    features = manifest.get("features") or {}
    if "computation" in features:
        return features["computation"]
    return computation_of(bool(features.get("exact", True)))


def check_feature_computation(artifact: Artifact, model: ModelSettings) -> None:
    """Refuse to serve an artifact with a feature backend that computes other features."""
    served = COMPUTATION_OF_BACKEND[model.backend]
    trained = artifact.computation
    if served == trained:
        return
    fitting = " or ".join(b for b, c in COMPUTATION_OF_BACKEND.items() if c == trained)
    raise ClassifierArtifactError(
        f"classifier artifact {artifact.path}: trained on {trained} features, but the "
        f"feature model's backend {model.backend!r} ({model.env_prefix}_BACKEND, default: the "
        f"executor's) computes {served} features; serve it with {model.env_prefix}_BACKEND="
        f"{fitting}, retrain it on features collected with this backend, or unset "
        "TANDEM_CLASSIFIER_ARTIFACT to use policy 'entropy'"
    )


def save_artifact(path: Path, model: Any, manifest: dict[str, Any]) -> None:
    """One zip: manifest.json (readable without unpickling) + model.joblib; written to a
    temporary file and renamed, so a reader never sees half an artifact."""
    import joblib

    buffer = io.BytesIO()
    joblib.dump(model, buffer)
    blob = buffer.getvalue()
    manifest = manifest | {"model_sha256": hashlib.sha256(blob).hexdigest()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest, indent=2, default=_json_default))
        archive.writestr("model.joblib", blob)
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def read_manifest(path: Path) -> dict[str, Any]:
    """The artifact's manifest, checked against this code's feature schema."""
    if not path.is_file():
        raise _artifact_error(path, "no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read("manifest.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise _artifact_error(path, f"not a readable classifier artifact ({e})") from None
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    if not isinstance(manifest, dict) or manifest.get("kind") != ARTIFACT_KIND:
        raise _artifact_error(path, f"not a {ARTIFACT_KIND} artifact")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise _artifact_error(path, f"schema version {version}, this code reads {SCHEMA_VERSION}")
    features = manifest.get("features") or {}
    if features.get("names") != list(FEATURE_NAMES) or features.get("count") != len(FEATURE_NAMES):
        raise _artifact_error(path, "its feature names differ from this code's FEATURE_NAMES")
    if (
        features.get("text_format") != TEXT_FORMAT
        or features.get("max_tokens") != SCORING_MAX_TOKENS
    ):
        raise _artifact_error(
            path, "its scoring text format or truncation differs from this code's"
        )
    if trained_computation(manifest) not in COMPUTATIONS:
        raise _artifact_error(
            path, f"unknown feature computation {trained_computation(manifest)!r}"
        )
    points = manifest.get("operating_points") or []
    n_stages = len(manifest.get("budgets") or [])
    if not points or any(len(p.get("thresholds", ())) != n_stages for p in points):
        raise _artifact_error(path, "its operating points are missing or malformed")


def load_artifact(path: Path) -> Artifact:
    """The checked manifest, then the model (its sha256 checked before unpickling).
    Unpickling runs code: only load artifacts you trust."""
    import joblib

    manifest = read_manifest(path)
    try:
        with zipfile.ZipFile(path) as archive:
            blob = archive.read("model.joblib")
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise _artifact_error(path, f"its model cannot be read ({error})") from None
    if hashlib.sha256(blob).hexdigest() != manifest.get("model_sha256"):
        raise _artifact_error(path, "its model does not match the manifest's checksum (corrupt)")
    try:
        model = joblib.load(io.BytesIO(blob))
    except Exception as error:  # unpickling fails in many ways: all mean "cannot use it"
        trained = manifest.get("provenance", {}).get("sklearn_version")
        raise _artifact_error(
            path,
            f"its model cannot be loaded ({type(error).__name__}: {error}; trained with "
            f"scikit-learn {trained})",
        ) from None
    if getattr(model, "n_features_in_", None) != len(FEATURE_NAMES):
        raise _artifact_error(
            path,
            f"its model takes {getattr(model, 'n_features_in_', '?')} "
            f"features, not {len(FEATURE_NAMES)}",
        )
    return Artifact(model, manifest, path)


def report_path(artifact: Path) -> Path:
    """Where `train` writes the report beside the artifact."""
    return artifact.with_name(artifact.name + ".report.json")


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
