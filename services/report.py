"""Human-readable renderings of a job's result (the CLI's table)."""

from __future__ import annotations

from typing import Any

COLUMNS = ("seq", "kind", "model", "prompt", "cached", "gen", "TFLOPs", "prefill", "latency", "decision")


def _decision(stage: dict[str, Any]) -> str:
    output = stage.get("output") or {}
    if "probability" in output:
        verdict = "stop" if output.get("sufficient") else "continue"
        return f"p={output['probability']:.3f} vs {output['threshold']:.2f}: {verdict}"
    return str(output.get("finish_reason", ""))


def stage_rows(stages: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [
        (
            str(s["seq"]), s["kind"], s["model"], str(s["prompt_tokens"]),
            str(s["cached_prompt_tokens"]), str(s["generated_tokens"]), f"{s['tflops']:.6f}",
            f"{s['prefill_tflops']:.6f}", f"{s['latency_s']:.2f}s", _decision(s),
        )
        for s in stages
    ]


def stage_table(result: dict[str, Any]) -> str:
    cost = result["cost"]
    rows = [*stage_rows(result["stages"])]
    total = (
        "total", "", "", str(cost["prompt_tokens"]), str(cost["cached_prompt_tokens"]),
        str(cost["generated_tokens"]), f"{cost['tflops']:.6f}", f"{cost['prefill_tflops']:.6f}",
        f"{cost['latency_s']:.2f}s", "",
    )
    table = [COLUMNS, *rows, total]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    header = f"answer: {result['answer']}   strategy: {result['strategy']}"
    if result.get("job_id"):
        header += f"   job: {result['job_id']}"
    return header + "\n\n" + "\n".join(lines)
