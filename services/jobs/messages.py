"""What a queue message carries: run step `seq` of job `job_id`, under the lease `token`.

The message also carries the step itself (so the worker that starts it need not replay the
job's records to learn it) and, for the retry a failed attempt sends itself, the holder it
retries for (so that retry may start again at once: see `start.take`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.core.steps import Step, step_from_json, step_to_json


@dataclass(frozen=True)
class Grant:
    token: str
    step: Step
    retry_of: str | None = None  # the holder whose failed attempt this message retries

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"token": self.token, "step": step_to_json(self.step)}
        if self.retry_of:
            data["retry_of"] = self.retry_of
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Grant:
        """Raises ValueError (or KeyError/TypeError) for a malformed grant."""
        return cls(str(data["token"]), step_from_json(data["step"]), data.get("retry_of"))


@dataclass(frozen=True)
class StageTask:
    """A message to put on a queue."""

    job_id: str
    seq: int
    queue: str
    grant: Grant | None = None  # None only for messages from before grants existed
