"""The evaluation's outputs beside results.jsonl: summary.json, table.md, pareto.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.md"
PLOT_FILE = "pareto.png"

TABLE_COLUMNS = (
    "strategy",
    "n",
    "{metric} [95% CI]",
    "mean TFLOPs",
    "saving vs {baseline}",
    "mean prefill TFLOPs",
    "coordinator tokens",
    "executor tokens",
    "coordinator share",
    "p50 latency",
    "p95 latency",
)


def write_report(out_dir: Path, summary: dict[str, Any]) -> None:
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / TABLE_FILE).write_text(markdown_table(summary), encoding="utf-8")
    plot_pareto(summary, out_dir / PLOT_FILE)


# --- the table --------------------------------------------------------------------------


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def signed_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def tflops(value: float) -> str:
    return f"{value:.4g}"


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def table_row(entry: dict[str, Any]) -> list[str]:
    accuracy = f"{pct(entry['accuracy'])} [{pct(entry['ci_low'])}, {pct(entry['ci_high'])}]"
    return [
        entry["label"],
        str(entry["n"]),
        accuracy,
        tflops(entry["mean_tflops"]),
        signed_pct(entry["saving_vs_baseline"]),
        tflops(entry["mean_prefill_tflops"]),
        f"{entry['mean_coordinator_tokens']:.1f}",
        f"{entry['mean_executor_tokens']:.1f}",
        pct(entry["coordinator_share"]),
        seconds(entry["latency_p50_s"]),
        seconds(entry["latency_p95_s"]),
    ]


def markdown_table(summary: dict[str, Any]) -> str:
    baseline = summary.get("baseline") or "llm_only"
    metric = summary.get("metric", "accuracy")
    header = [column.format(baseline=baseline, metric=metric) for column in TABLE_COLUMNS]
    lines = [
        f"# Evaluation: {metric} against cost",
        "",
        f"Dataset: `{summary.get('dataset', '')}`, {summary.get('n_questions')} questions; "
        f"generated {summary.get('generated_at', '')}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(table_row(entry)) + " |" for entry in summary["strategies"]]
    lines += ["", *_notes(summary)]
    return "\n".join(lines) + "\n"


def _notes(summary: dict[str, Any]) -> list[str]:
    notes = [
        "TFLOPs: the paper's metric, 2 x (P_coordinator x coordinator tokens + P_executor x "
        "executor tokens) / 1e12, generated tokens only, mean per question. Prefill TFLOPs: "
        "uncached prompt tokens and the classifier's scoring pass, which the paper leaves out. "
        "Saving: 1 - mean TFLOPs / the baseline's. Tokens: mean generated per question. "
        "Coordinator share: coordinator tokens / all generated tokens. Latency: wall-clock "
        "per job with the other jobs of the run in flight.",
        "",
        f"Pareto front ({summary.get('metric', 'accuracy')} against TFLOPs): "
        f"{', '.join(summary['pareto_front']) or 'none'}.",
    ]
    if summary.get("metric") == "pass@1":
        notes += ["", _pass_at_1_note(summary)]
    errors = [f"{e['label']} {e['errors']}" for e in summary["strategies"] if e.get("errors")]
    if errors:
        notes += ["", f"Jobs that ended in an error (counted as wrong): {', '.join(errors)}."]
    models = _models_line(summary)
    if models:
        notes += ["", models]
    return notes


def _pass_at_1_note(summary: dict[str, Any]) -> str:
    verdicts = "; ".join(
        f"{e['label']} " + ", ".join(f"{n} {name}" for name, n in e.get("verdicts", {}).items())
        for e in summary["strategies"]
        if e.get("verdicts")
    )
    return (
        "pass@1: the share of problems whose one answer passed every test of the problem, run "
        "in a sandbox (error: no runnable function in the answer). Verdicts: "
        f"{verdicts or 'none'}."
    )


def _models_line(summary: dict[str, Any]) -> str:
    by_role: dict[str, set[str]] = {}
    for entry in summary["strategies"]:
        for role, names in entry.get("models", {}).items():
            by_role.setdefault(role, set()).update(names)
    if not by_role:
        return ""
    parts = [f"{role}: {', '.join(sorted(names))}" for role, names in sorted(by_role.items())]
    return "Models: " + "; ".join(parts) + "."


# --- the plot ---------------------------------------------------------------------------


def plot_pareto(summary: dict[str, Any], path: Path) -> None:
    """Accuracy (with its 95% interval) against mean TFLOPs, one point per strategy label,
    the Pareto front drawn as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    entries = [e for e in summary["strategies"] if e["n"] and e["accuracy"] is not None]
    figure = Figure(figsize=(7.5, 5), dpi=120)
    axes = figure.add_subplot()
    on_front = set(summary["pareto_front"])
    right = max((e["mean_tflops"] for e in entries), default=0.0)
    groups = sorted(_same_point(entries), key=lambda g: (g[0]["mean_tflops"], g[0]["accuracy"]))
    # A label runs right of its point; about 0.011 of the x range per character at this size.
    char = 0.011 * (right * 1.25 if right > 0 else 1.0)
    placed: list[tuple[float, float, float]] = []  # x, accuracy, where its label ends
    for group in groups:
        x, y = group[0]["mean_tflops"], group[0]["accuracy"]
        label_end = x + char * len(", ".join(e["label"] for e in group))
        near = sum(
            1
            for px, py, end in placed
            if px - 0.08 * right < x < max(end, px + 0.08 * right) and abs(py - y) < 0.05
        )
        placed.append((x, y, label_end))
        _plot_point(axes, group, any(e["label"] in on_front for e in group), lift=near)
    front = [e for label in summary["pareto_front"] for e in entries if e["label"] == label]
    if len(front) > 1:
        axes.step(
            [e["mean_tflops"] for e in front],
            [100 * e["accuracy"] for e in front],
            where="post",
            color="tab:green",
            linewidth=1.5,
            alpha=0.7,
            label="Pareto front",
        )
        axes.legend(loc="lower right")
    axes.set_xlabel("mean TFLOPs per question (generated tokens, paper metric)")
    metric = summary.get("metric", "accuracy")
    axes.set_ylabel(f"{metric} (%), 95% Wilson interval")
    axes.set_title(
        f"{metric.capitalize()} against cost: {Path(str(summary.get('dataset', ''))).name}"
    )
    axes.grid(True, alpha=0.3)
    axes.set_ylim(-2, 102)
    axes.set_xlim(0, right * 1.25 if right > 0 else 1.0)
    figure.tight_layout()
    figure.savefig(path)


def _same_point(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Entries grouped by where they land, so labels of identical points do not overprint."""
    groups: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for entry in entries:
        where = (round(entry["mean_tflops"], 12), round(entry["accuracy"], 9))
        groups.setdefault(where, []).append(entry)
    return list(groups.values())


def _plot_point(axes: Any, group: list[dict[str, Any]], on_front: bool, lift: int = 0) -> None:
    """One point with its interval; `lift` raises the label above nearby ones."""
    entry = group[0]
    x, y = entry["mean_tflops"], 100 * entry["accuracy"]
    errors = [[max(0.0, y - 100 * entry["ci_low"])], [max(0.0, 100 * entry["ci_high"] - y)]]
    color = "tab:green" if on_front else "tab:gray"
    axes.errorbar([x], [y], yerr=errors, fmt="o", color=color, capsize=3, markersize=7)
    label = ", ".join(e["label"] for e in group)
    axes.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6 + 13 * lift), fontsize=9)
