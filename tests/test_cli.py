"""`tandem run`, as a user runs it: a real job on the default model, recorded in SQLite, and
one-line errors (no traceback, non-zero exit) for everything a user can get wrong."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.infra import BIN, ROOT, free_port

pytestmark = pytest.mark.model

NATALIA = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?"
)


def tandem(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "TANDEM_DATABASE_URL": f"sqlite:///{tmp_path / 'tandem.db'}",
        "TANDEM_LOCAL_THREADS": "1",
        **env,
    }
    return subprocess.run(
        [str(BIN / "tandem"), *args],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_run_json_stages_add_up_to_the_totals(tmp_path: Path) -> None:
    result = tandem(
        tmp_path,
        "run",
        NATALIA,
        "--json",
        "--budgets",
        "0,8,16",
        "--params",
        '{"executor_max_tokens": 16}',
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert set(body) >= {"answer", "strategy", "stages", "cost", "job_id"}
    stages, cost = body["stages"], body["cost"]
    assert stages[0]["kind"] == "classifier" and stages[-1]["kind"] == "executor"
    for field in ("prompt_tokens", "cached_prompt_tokens", "generated_tokens"):
        assert cost[field] == sum(stage[field] for stage in stages)
    for field in ("tflops", "prefill_tflops"):
        assert cost[field] == pytest.approx(sum(stage[field] for stage in stages))
    n_params = 134_515_008  # SmolLM2-135M, as llama.cpp reports it
    assert cost["tflops"] == pytest.approx(2 * n_params * cost["generated_tokens"] / 1e12, rel=0.01)
    # Recorded like a service job, in the same schema.
    import sqlite3

    with sqlite3.connect(tmp_path / "tandem.db") as db:
        status, stored = db.execute(
            "SELECT status, (SELECT count(*) FROM stages WHERE job_id = jobs.id) FROM jobs"
        ).fetchone()
    assert (status, stored) == ("succeeded", len(stages))


def test_table_output(tmp_path: Path) -> None:
    result = tandem(
        tmp_path,
        "run",
        "What is 2+2?",
        "--strategy",
        "slm_only",
        "--params",
        '{"executor_max_tokens": 8}',
        "--no-record",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("answer:") and "total" in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["run", ""], {}, "question is empty"),
        (["run", "x" * 8001], {}, "limit is 8000"),
        (["run", "q", "--strategy", "magic"], {}, "unknown strategy"),
        (["run", "q", "--budgets", "0,500,100"], {}, "strictly increasing"),
        (["run", "q", "--budgets", "a,b"], {}, "comma-separated whole numbers"),
        (["run", "q", "--params", "{"], {}, "--params is not valid JSON"),
        (
            ["run", "q"],
            {"TANDEM_COORDINATOR_MODEL": "/nonexistent/model.gguf"},
            "/nonexistent/model.gguf",
        ),
        (["run", "q"], {"TANDEM_COORDINATOR_BACKEND": "sglang"}, "TANDEM_COORDINATOR_URL"),
    ],
)
def test_bad_input_is_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], fragment: str
) -> None:
    result = tandem(tmp_path, *args, "--no-record", **env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tandem: error:"), result.stderr
    assert fragment in lines[0]


def test_corrupt_model_and_unreachable_server_are_one_line(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\0" * 64)
    unreachable = f"http://127.0.0.1:{free_port()}"
    cases = [
        ({"TANDEM_EXECUTOR_MODEL": str(corrupt)}, str(corrupt)),
        (
            {
                "TANDEM_EXECUTOR_BACKEND": "sglang",
                "TANDEM_EXECUTOR_URL": unreachable,
                "TANDEM_EXECUTOR_PARAMS": "7000000000",
                "TANDEM_HTTP_RETRIES": "0",
            },
            unreachable,
        ),
    ]
    for env, fragment in cases:
        result = tandem(tmp_path, "run", "q", "--strategy", "slm_only", "--no-record", **env)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode != 0 and len(lines) == 1, result.stderr
        assert lines[0].startswith("tandem: error:") and fragment in lines[0]
