"""The cascade: which stage each question stops at under per-stage thresholds, the
thresholds that maximise `accuracy - lambda * mean TFLOPs`, and the report that sets the
trained cascade beside every fixed stage and the oracle (tandem.md, "Classifier model,
labels, thresholds"). Plain numpy over (questions x stages) arrays: no model, no files.

An operating point is the cascade searched at one lambda; an artifact stores one per
lambda in LAMBDA_FRACTIONS, and the served policy picks one per job.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.core.classifier.samples import Samples

THRESHOLD_STEP = 0.05
THRESHOLD_GRID: tuple[float, ...] = tuple(round(i * THRESHOLD_STEP, 2) for i in range(21))
# Lambdas are in accuracy per TFLOP. They are trained as fractions of the cost scale (the
# mean TFLOPs of the most expensive fixed stage on the training data): a fraction f means
# "giving up f of accuracy is worth saving the whole cost of the last stage".
LAMBDA_FRACTIONS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
PRESET_FRACTIONS: dict[str, float] = {"quality": 0.0, "balanced": 0.05, "economy": 0.2}
_EXHAUSTIVE_MAX_FREE_STAGES = 4  # 21^4 threshold tuples at most; beyond, coordinate ascent


@dataclass(frozen=True)
class CascadeResult:
    thresholds: tuple[float, ...]
    accuracy: float
    tflops: float
    stop_share: tuple[float, ...]  # share of questions stopping at each stage

    def objective(self, lam: float) -> float:
        return self.accuracy - lam * self.tflops


def stop_stages(probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """The stage each question stops at: the first whose probability reaches its threshold,
    else the last (whose own threshold is never looked at)."""
    n, s = probs.shape
    stop = np.full(n, s - 1)
    for stage in range(s - 2, -1, -1):
        stop = np.where(probs[:, stage] >= thresholds[stage], stage, stop)
    return stop


def simulate(
    probs: np.ndarray, correct: np.ndarray, cost: np.ndarray, thresholds: Sequence[float]
) -> CascadeResult:
    stop = stop_stages(probs, thresholds)
    rows = np.arange(len(stop))
    share = np.bincount(stop, minlength=probs.shape[1]) / max(1, len(stop))
    return CascadeResult(
        thresholds=tuple(float(t) for t in thresholds),
        accuracy=float(correct[rows, stop].mean()) if len(stop) else 0.0,
        tflops=float(cost[rows, stop].mean()) if len(stop) else 0.0,
        stop_share=tuple(float(x) for x in share),
    )


def search_thresholds(
    probs: np.ndarray,
    correct: np.ndarray,
    cost: np.ndarray,
    lam: float,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> CascadeResult:
    """Per-stage thresholds maximising `accuracy - lam * mean cost` over the cascade.

    Exhaustive over the grid for up to 4 free stages (the last stage needs no threshold):
    thresholds that stop the same questions at a stage form one candidate, represented by
    the middle grid value of that run (the least committal choice for unseen questions).
    Ties in the objective go to the cheaper cascade, then to the first found. Beyond 4 free
    stages, coordinate ascent from the all-0.5 start (a local optimum).
    """
    n, s = probs.shape
    if s == 1 or n == 0:
        return simulate(probs, correct, cost, (0.0,) * s)
    free = s - 1
    if free <= _EXHAUSTIVE_MAX_FREE_STAGES:
        best = _exhaustive(probs, correct.astype(np.float64), cost, lam, tuple(grid))
    else:
        best = _coordinate_ascent(probs, correct, cost, lam, tuple(grid))
    return simulate(probs, correct, cost, (*best, 0.0))


def _candidates(p: np.ndarray, remaining: np.ndarray, grid: tuple[float, ...]) -> list[float]:
    """One threshold per distinct set of remaining questions it would stop."""
    counts = [int((remaining & (p >= t)).sum()) for t in grid]
    runs = [list(g) for _, g in itertools.groupby(range(len(grid)), key=lambda i: counts[i])]
    return [grid[run[(len(run) - 1) // 2]] for run in runs]


def _exhaustive(
    probs: np.ndarray, correct: np.ndarray, cost: np.ndarray, lam: float, grid: tuple[float, ...]
) -> tuple[float, ...]:
    n, s = probs.shape
    best: list[Any] = [-math.inf, math.inf, ()]  # objective, total cost, thresholds

    def visit(stage: int, remaining: np.ndarray, acc: float, spent: float, chosen: tuple) -> None:
        if stage == s - 1:
            acc += correct[remaining, stage].sum()
            spent += cost[remaining, stage].sum()
            value = (acc - lam * spent) / n
            if value > best[0] + 1e-12 or (
                abs(value - best[0]) <= 1e-12 and spent < best[1] - 1e-12
            ):
                best[:] = [value, spent, chosen]
            return
        p = probs[:, stage]
        for t in _candidates(p, remaining, grid):
            stop = remaining & (p >= t)
            visit(
                stage + 1,
                remaining & ~stop,
                acc + correct[stop, stage].sum(),
                spent + cost[stop, stage].sum(),
                (*chosen, t),
            )

    visit(0, np.ones(n, dtype=bool), 0.0, 0.0, ())
    return best[2]


def _coordinate_ascent(
    probs: np.ndarray, correct: np.ndarray, cost: np.ndarray, lam: float, grid: tuple[float, ...]
) -> tuple[float, ...]:
    s = probs.shape[1]
    current = [0.5] * (s - 1)

    def score(ts: Sequence[float]) -> tuple[float, float]:
        result = simulate(probs, correct, cost, (*ts, 0.0))
        return (result.objective(lam), -result.tflops)

    best = score(current)
    for _ in range(20):
        improved = False
        for stage in range(s - 1):
            for t in grid:
                trial = [*current[:stage], t, *current[stage + 1 :]]
                value = score(trial)
                if value > best:
                    best, current, improved = value, trial, True
        if not improved:
            break
    return tuple(current)


def oracle(correct: np.ndarray, cost: np.ndarray) -> CascadeResult:
    """Stop at the first stage whose answer is correct (stage 0 when none is)."""
    first = np.where(correct.any(axis=1), correct.argmax(axis=1), 0)
    rows = np.arange(len(first))
    share = np.bincount(first, minlength=correct.shape[1]) / max(1, len(first))
    return CascadeResult(
        thresholds=(),
        accuracy=float(correct[rows, first].mean()),
        tflops=float(cost[rows, first].mean()),
        stop_share=tuple(float(x) for x in share),
    )


@dataclass
class OperatingPoint:
    lam: float
    fraction: float
    thresholds: tuple[float, ...]
    accuracy: float
    tflops: float
    stop_share: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "lambda": self.lam,
            "fraction": self.fraction,
            "thresholds": list(self.thresholds),
            "accuracy": self.accuracy,
            "tflops": self.tflops,
            "stop_share": list(self.stop_share),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OperatingPoint:
        return cls(
            lam=float(data["lambda"]),
            fraction=float(data.get("fraction", math.nan)),
            thresholds=tuple(float(t) for t in data["thresholds"]),
            accuracy=float(data.get("accuracy", math.nan)),
            tflops=float(data.get("tflops", math.nan)),
            stop_share=tuple(data.get("stop_share", ())),
        )


def operating_points(
    probs: np.ndarray, correct: np.ndarray, cost: np.ndarray, cost_scale: float
) -> list[OperatingPoint]:
    points = []
    for fraction in LAMBDA_FRACTIONS:
        lam = fraction / cost_scale
        result = search_thresholds(probs, correct, cost, lam)
        points.append(
            OperatingPoint(
                lam, fraction, result.thresholds, result.accuracy, result.tflops, result.stop_share
            )
        )
    return points


def cascade_report(
    samples: Samples,
    probs: np.ndarray,
    points: Sequence[OperatingPoint],
    presets: dict[str, float],
) -> dict[str, Any]:
    """The cascade at each operating point beside every fixed stage and the oracle."""
    rows: list[dict[str, Any]] = []
    for stage, budget in enumerate(samples.budgets):
        rows.append(
            _row(
                f"fixed stage {stage} ({budget} tok)",
                samples.correct[:, stage].mean(),
                samples.cost[:, stage].mean(),
                None,
            )
        )
    best = oracle(samples.correct, samples.cost)
    rows.append(_row("oracle (first correct stage)", best.accuracy, best.tflops, best.stop_share))
    names = {round(v, 15): k for k, v in presets.items()}
    for point in points:
        result = simulate(probs, samples.correct, samples.cost, point.thresholds)
        label = f"cascade lambda={point.lam:.4g} (f={point.fraction:g})"
        if round(point.lam, 15) in names:
            label += f" [{names[round(point.lam, 15)]}]"
        rows.append(
            _row(label, result.accuracy, result.tflops, result.stop_share)
            | {"thresholds": list(point.thresholds), "lambda": point.lam}
        )
    return {"questions": samples.n, "budgets": list(samples.budgets), "rows": rows}


def _row(
    name: str, accuracy: float, tflops: float, share: Sequence[float] | None
) -> dict[str, Any]:
    row = {"policy": name, "accuracy": float(accuracy), "tflops": float(tflops)}
    if share is not None:
        row["stop_share"] = [round(float(x), 4) for x in share]
    return row


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    lines = []
    clf = report.get("classifier")
    if clf:
        auc = "n/a" if clf.get("auc") is None else f"{clf['auc']:.3f}"
        lines.append(
            f"classifier: {clf['questions_kept']}/{clf['questions']} questions kept, "
            f"{clf['rows']} rows, positive rate {clf['positive_rate']:.3f}, "
            f"accuracy at 0.5 {clf['accuracy']:.3f}, AUC {auc} ({clf['evaluated_on']})"
        )
    lines.append(f"{report['questions']} questions, budgets {report['budgets']}")
    width = max(len(r["policy"]) for r in report["rows"])
    lines.append(f"{'policy':<{width}}  accuracy   TFLOPs/q   stop share per stage  thresholds")
    for r in report["rows"]:
        share = " ".join(f"{x:.2f}" for x in r.get("stop_share", [])) or "-"
        thresholds = " ".join(f"{t:.2f}" for t in r.get("thresholds", [])) or "-"
        lines.append(
            f"{r['policy']:<{width}}  {r['accuracy']:8.3f}  {r['tflops']:9.4f}   "
            f"{share:<20}  {thresholds}"
        )
    return "\n".join(lines)
