"""The evaluation summary, computed from result rows only (so anyone can recompute it).

Per strategy label: accuracy (for code: pass@1, the share of problems whose one greedy
answer passed its tests in the sandbox) with a 95% Wilson score interval, mean cost per question (the
paper's TFLOPs and the prefill TFLOPs it leaves out), the saving in mean TFLOPs against the
baseline (`llm_only`), mean generated tokens per role, the coordinator's share of all
generated tokens (ratio of sums), latency percentiles (linear interpolation), and which
stage Tandem-like strategies stopped at, and for code the grader's verdicts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return low, high


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def strategy_summary(label: str, strategy: str, params: dict, rows: list[dict]) -> dict[str, Any]:
    n = len(rows)
    correct = sum(1 for row in rows if row["correct"])
    low, high = wilson_interval(correct, n)
    coordinator = [row["generated_by_role"].get("coordinator", 0) for row in rows]
    executor = [row["generated_by_role"].get("executor", 0) for row in rows]
    generated = sum(coordinator) + sum(executor)
    latencies = [row["latency_s"] for row in rows]
    return {
        "label": label,
        "strategy": strategy,
        "params": params,
        "n": n,
        "correct": correct,
        "errors": sum(1 for row in rows if row.get("error")),
        "accuracy": correct / n if n else None,
        "ci_low": low,
        "ci_high": high,
        "mean_tflops": mean([row["cost"]["tflops"] for row in rows]),
        "mean_prefill_tflops": mean([row["cost"]["prefill_tflops"] for row in rows]),
        "mean_coordinator_tokens": mean(coordinator),
        "mean_executor_tokens": mean(executor),
        "coordinator_share": sum(coordinator) / generated if generated else None,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "stopped_at_stage": _stop_stages(rows),
        "models": _models(rows),
        "saving_vs_baseline": None,
    } | _verdicts(rows)


def _verdicts(rows: list[dict]) -> dict[str, Any]:
    """Code rows: how many answers passed, failed, timed out, could not run (error), or were
    not graded (the job itself failed)."""
    if not any(row.get("task") == "code" for row in rows):
        return {}
    counts = Counter(row.get("verdict") or "not graded" for row in rows)
    order = ("passed", "failed", "timeout", "error", "not graded")
    return {"verdicts": {name: counts[name] for name in order if counts[name]}}


def _stop_stages(rows: list[dict]) -> dict[str, int]:
    stops = Counter(
        str(row["outcome"]["stopped_at_stage"])
        for row in rows
        if "stopped_at_stage" in (row.get("outcome") or {})
    )
    return dict(sorted(stops.items(), key=lambda item: int(item[0])))


def _models(rows: list[dict]) -> dict[str, list[str]]:
    by_role: dict[str, set[str]] = {}
    for row in rows:
        for role, model in (row.get("models") or {}).items():
            by_role.setdefault(role, set()).add(model)
    return {role: sorted(models) for role, models in sorted(by_role.items())}


def summarize(
    rows: list[dict[str, Any]],
    specs: Sequence[Any],
    *,
    baseline: str = "llm_only",
    dataset: str = "",
    n_questions: int | None = None,
    task: str = "math",
) -> dict[str, Any]:
    """The summary of rows (as selected for `specs`), in the order of `specs`."""
    entries = [
        strategy_summary(
            spec.label, spec.strategy, spec.params, [r for r in rows if r["strategy"] == spec.label]
        )
        for spec in specs
    ]
    base = next((e for e in entries if e["label"] == baseline), None)
    for entry in entries:
        if base and base["mean_tflops"] > 0 and entry["n"]:
            entry["saving_vs_baseline"] = 1 - entry["mean_tflops"] / base["mean_tflops"]
    return {
        "dataset": dataset,
        "task": task,
        "metric": "pass@1" if task == "code" else "accuracy",
        "n_questions": n_questions,
        "baseline": baseline if base else None,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "strategies": entries,
        "pareto_front": pareto_front(entries),
    }


def pareto_front(entries: Sequence[dict[str, Any]]) -> list[str]:
    """Labels not beaten by another point (no cheaper-or-equal point at least as accurate
    and strictly better in one), cheapest first."""
    points = [e for e in entries if e["n"] and e["accuracy"] is not None]
    points.sort(key=lambda e: (e["mean_tflops"], -e["accuracy"]))
    front: list[str] = []
    best = -1.0
    for entry in points:
        if entry["accuracy"] > best:
            front.append(entry["label"])
            best = entry["accuracy"]
    return front
