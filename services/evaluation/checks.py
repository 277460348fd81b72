"""Is a job's answer right? The row fields that say so, per task.

- math: the answer is compared with the gold answer (`answers.is_correct`);
- code: the answer (the function the job extracted; when it found none, the job's whole
  final text, which the grader reads as a reply or as a completion of the prompt) is run
  against the problem's tests in a bubblewrap sandbox (`services.grading`): correct means
  the verdict is `passed`. Grading happens here, in the evaluation process, whichever
  runner ran the job (embedded or through the services): the services never run code.

A job that ended in an error is not checked (counted wrong, `verdict` null for code).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from services.core.answers import is_correct

if TYPE_CHECKING:
    from services.evaluation.harness import Question
    from services.grading.humaneval import Grader


class AnswerChecker:
    """Checks rows; for code it grades at most `grader.workers` answers at once."""

    def __init__(self, grader: Grader | None = None) -> None:
        self.grader = grader
        self._slots = threading.BoundedSemaphore(grader.workers if grader else 1)

    def check(self, question: Question, job: dict[str, Any], error: str | None) -> dict[str, Any]:
        """`correct` and, for code, `verdict`, `grade_reason` and `grade_seconds`."""
        if question.task != "code":
            correct = error is None and is_correct(job.get("answer"), question.reference or "")
            return {"correct": correct}
        if error is not None:
            return {"correct": False, "verdict": None, "grade_reason": "", "grade_seconds": 0.0}
        if self.grader is None:
            raise RuntimeError("code questions need a grader: build the checker with one")
        candidate = job.get("answer") or job.get("final_text") or ""
        with self._slots:
            grade = self.grader.grade(question.problem, candidate)
        return {
            "correct": grade.verdict == "passed",
            "verdict": grade.verdict,
            "grade_reason": grade.reason,
            "grade_seconds": round(grade.seconds, 4),
        }


def grader_from_settings(settings: Any = None) -> Grader:
    """The sandboxed grader with the TANDEM_GRADER_* limits (raises SandboxUnavailable
    where this host cannot sandbox: nothing is ever run unsandboxed)."""
    from services.grading.humaneval import Grader
    from services.grading.sandbox import limits_from_settings
    from services.settings import get_settings

    settings = settings or get_settings()
    return Grader(
        limits_from_settings(settings), settings.grader_workers or None, settings.grader_python
    )
