"""A classifier worker with a missing or broken artifact stops at start with one line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.infra import BIN, ROOT


@pytest.mark.parametrize("content", [None, b"not a zip"])
def test_bad_artifact_stops_the_worker_at_start(tmp_path: Path, redis_url: str, content) -> None:
    artifact = tmp_path / "classifier.zip"
    if content is not None:
        artifact.write_bytes(content)
    env = {**os.environ, "TANDEM_CLASSIFIER_ARTIFACT": str(artifact), "TANDEM_REDIS_URL": redis_url}
    result = subprocess.run(
        [str(BIN / "celery"), "-A", "workers", "worker", "-Q", "classifier", "--pool", "threads"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 78
    message = [line for line in result.stderr.splitlines() if line.startswith("tandem worker:")]
    assert len(message) == 1 and str(artifact) in message[0]
    assert "Traceback" not in result.stderr
