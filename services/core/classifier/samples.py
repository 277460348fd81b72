"""The classifier's training data on disk, and read back as arrays.

A collection directory holds `samples.jsonl` (one line per question: every stage with its
25 features, whether the executor was right there, and the cost of stopping there; written
by `collect`, appended durably with `services.core.jsonl`) and `meta.json` (the options and
models it was collected with). `load_samples` turns it into N questions x S stages arrays
for `training` and `cascade`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.core import jsonl
from services.core.prompts import classifier_text

SAMPLES_FORMAT = "tandem-classifier-samples"
SAMPLES_VERSION = 1
SAMPLES_FILE = "samples.jsonl"
META_FILE = "meta.json"
# The scoring text, rendered by `prompts.classifier_text` (Hint left out at stage 0).
TEXT_FORMAT = classifier_text("{question}", "{hint}")


class TrainingError(ValueError):
    """The collected data cannot train a classifier (too few usable questions)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Samples:
    """Collected data as arrays: N questions x S stages."""

    ids: list[str]
    budgets: tuple[int, ...]
    features: np.ndarray  # (N, S, F)
    correct: np.ndarray  # (N, S) bool
    cost: np.ndarray  # (N, S) TFLOPs of stopping at each stage
    reached: np.ndarray  # (N, S) bool: False for stages after the coordinator finished
    exact: bool  # every feature computed from full logits (not top-k estimates)
    meta: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    @property
    def n(self) -> int:
        return len(self.ids)

    def kept(self) -> np.ndarray:
        """Questions whose label differs between reached stages (tandem.md: drop the rest)."""
        lo = np.where(self.reached, self.correct, True).all(axis=1)
        hi = np.where(self.reached, self.correct, False).any(axis=1)
        return ~lo & hi


def samples_path(data: Path) -> Path:
    return data / SAMPLES_FILE if data.is_dir() else data


def load_samples(data: Path) -> Samples:
    """The samples of a collection directory (or of its samples.jsonl)."""
    path = samples_path(data)
    if not path.is_file():
        raise TrainingError(
            f"no collected samples at {path}: run `tandem classifier collect` first"
        )
    try:
        lines = [line for _, line in jsonl.read(path)]
    except jsonl.BadLine as error:
        raise TrainingError(str(error)) from None
    if not lines:
        raise TrainingError(f"{path} holds no questions yet")
    budgets = tuple(s["budget"] for s in lines[0]["stages"])
    for line in lines:
        if tuple(s["budget"] for s in line["stages"]) != budgets:
            raise TrainingError(
                f"{path}: question {line['id']} has budgets different from "
                f"{list(budgets)}; collect each budget set in its own directory"
            )
    exact = {bool(s["features_exact"]) for line in lines for s in line["stages"]}
    if len(exact) > 1:
        raise TrainingError(
            f"{path} mixes exact features with top-k estimates (collected with different "
            "feature backends); collect each in its own directory"
        )
    meta_path = path.parent / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}

    def grid(key: str) -> np.ndarray:
        return np.array([[s[key] for s in line["stages"]] for line in lines])

    return Samples(
        ids=[line["id"] for line in lines],
        budgets=budgets,
        features=grid("features").astype(np.float64),
        correct=grid("correct").astype(bool),
        cost=grid("tflops").astype(np.float64),
        reached=grid("reached").astype(bool),
        exact=exact.pop(),
        meta=meta,
        source=path,
    )
