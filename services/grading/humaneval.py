"""HumanEval-format code problems, and grading a candidate against a problem's tests.

A problem is one JSONL line with ``task_id``, ``prompt`` (imports, helpers, and the
signature and docstring of the function to write), ``entry_point`` (that function's name),
``test`` (Python defining ``check(candidate)``) and, optionally, ``canonical_solution`` (the
body that completes the prompt). ``load_problems`` refuses a malformed line by file and
line number.

A candidate is any of: a whole reply from the executor, a function (what
``services.core.answers.extract_code`` returns), or a HumanEval-style completion (a body
that continues the prompt, as the canonical solutions are). The program run in the sandbox
is then

    the prompt up to the entry point's stub (its imports, helpers and constants)
    + the function extract_code finds in the candidate      (reply or function)
      or: the whole prompt + the candidate                   (a completion)
    + the problem's test code
    + check(<entry_point>)

Verdicts (``Grade.verdict``):

- ``passed``: the program ran to its end: every check held;
- ``failed``: the candidate ran and a check failed, or it raised, called exit, left early,
  or was stopped by a limit other than time (memory, file size, processes); the reason is
  the exception and the line it came from, e.g. ``AssertionError (line 23: assert
  candidate(3) == 4)``;
- ``timeout``: the wall-clock or CPU-time limit;
- ``error``: the candidate could not be run: no function named ``entry_point`` can be found
  in it, it does not parse, or the sandbox did not start. Kept apart from ``failed`` so that
  "the model wrote no usable code" and "its code is wrong" can be told apart; pass@1 counts
  both as not passed.

``Grader.grade_many`` grades items in parallel, each in its own sandbox, in a bounded pool,
and yields the grades in input order.
"""

from __future__ import annotations

import ast
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core import jsonl
from services.core.answers import extract_code
from services.grading.sandbox import Sandbox, SandboxLimits, SandboxResult, Verdict

__all__ = [
    "DatasetError",
    "Grade",
    "Grader",
    "Problem",
    "Solution",
    "build_program",
    "load_problems",
    "load_solutions",
]

REQUIRED_FIELDS = ("task_id", "prompt", "entry_point", "test")


class DatasetError(ValueError):
    """A problem or solution file that cannot be read; the message names file and line."""


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str | None = None


@dataclass(frozen=True)
class Solution:
    task_id: str
    completion: str
    where: str = ""  # file:line, for messages


@dataclass(frozen=True)
class Grade:
    task_id: str
    verdict: Verdict
    reason: str
    seconds: float
    result: SandboxResult | None = None  # None when the candidate never reached a sandbox

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "verdict": self.verdict,
            "reason": self.reason,
            "seconds": self.seconds,
        }


# ---------------------------------------------------------------- files


def load_problems(path: str | Path) -> list[Problem]:
    """Every problem of a HumanEval-format JSONL file (blank lines skipped)."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for where, record in _records(path):
        missing = [name for name in REQUIRED_FIELDS if name not in record]
        if missing:
            raise DatasetError(
                f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"(a HumanEval line has {', '.join(REQUIRED_FIELDS)}, canonical_solution)"
            )
        for name in (*REQUIRED_FIELDS, "canonical_solution"):
            if name in record and not isinstance(record[name], str):
                raise DatasetError(f"{where}: field {name} must be a string")
        if not record["entry_point"].isidentifier():
            raise DatasetError(
                f"{where}: entry_point {record['entry_point']!r} is not a Python identifier"
            )
        if record["task_id"] in seen:
            raise DatasetError(f"{where}: task_id {record['task_id']!r} appears twice")
        seen.add(record["task_id"])
        problems.append(
            Problem(
                task_id=record["task_id"],
                prompt=record["prompt"],
                entry_point=record["entry_point"],
                test=record["test"],
                canonical_solution=record.get("canonical_solution"),
            )
        )
    if not problems:
        raise DatasetError(f"{path}: no problems in the file")
    return problems


def load_solutions(path: str | Path) -> list[Solution]:
    """Candidate solutions: JSONL of ``task_id`` and ``completion`` (several per task allowed)."""
    solutions: list[Solution] = []
    for where, record in _records(path):
        for name in ("task_id", "completion"):
            if name not in record:
                raise DatasetError(f"{where}: missing field {name} (a line has task_id, completion)")
            if not isinstance(record[name], str):
                raise DatasetError(f"{where}: field {name} must be a string")
        solutions.append(Solution(record["task_id"], record["completion"], where))
    if not solutions:
        raise DatasetError(f"{path}: no solutions in the file")
    return solutions


def _records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        yield from jsonl.objects(path)
    except jsonl.BadObject as error:
        raise DatasetError(str(error)) from None


# ---------------------------------------------------------------- programs


def build_program(problem: Problem, candidate: str) -> tuple[str | None, str]:
    """The program that checks ``candidate`` against ``problem``: (program, "") or
    (None, why the candidate cannot be run)."""
    check = f"\n\n{problem.test}\n\ncheck({problem.entry_point})\n"
    answer = extract_code(candidate, problem.entry_point)
    if answer.code is not None:
        return f"{_preamble(problem)}\n\n{answer.code}{check}", ""
    first = next((line for line in candidate.splitlines() if line.strip()), "")
    if not first[:1].isspace():  # a completion continues the stub's body: it is indented
        return None, answer.reason
    completed = problem.prompt + candidate
    try:
        module = ast.parse(completed)
    except SyntaxError as error:
        line = (error.lineno or 0) - problem.prompt.count("\n")
        where = f" (line {line} of the completion)" if line > 0 else ""
        return None, f"{answer.reason}; as a completion of the prompt: SyntaxError: {error.msg}{where}"
    except (ValueError, RecursionError, MemoryError) as error:
        return None, f"{answer.reason}; as a completion: {type(error).__name__}"
    stubs = [
        node
        for node in module.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name == problem.entry_point
    ]
    # A completion continues the entry point's body: the function must end past the prompt
    # (else it is the prompt's docstring-only stub, and the candidate wrote something else).
    if not stubs or (stubs[-1].end_lineno or 0) <= problem.prompt.count("\n"):
        return None, answer.reason
    return completed + check, ""


def _preamble(problem: Problem) -> str:
    """The prompt before the entry point's stub: its imports, helpers and constants."""
    stubs = list(
        re.finditer(rf"^(?:async[ \t]+)?def[ \t]+{problem.entry_point}[ \t]*\(", problem.prompt, re.M)
    )
    if not stubs:
        return problem.prompt
    start = stubs[-1].start()
    decorated = re.search(r"(?:^@[^\n]*\n)+\Z", problem.prompt[:start], re.M)
    return problem.prompt[: decorated.start() if decorated else start]


# ---------------------------------------------------------------- grading


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) or 1


class Grader:
    """Grades candidates in sandboxes, ``workers`` at a time.

    Builds its Sandbox at once, so a host that cannot sandbox fails here, before any work
    (``SandboxUnavailable``).
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        workers: int | None = None,
        python: str | None = None,
    ) -> None:
        self.sandbox = Sandbox(limits, python)
        self.workers = workers or default_workers()
        if self.workers < 1:
            raise ValueError("workers must be at least 1")

    def grade(self, problem: Problem, candidate: str) -> Grade:
        program, reason = build_program(problem, candidate)
        if program is None:
            return Grade(problem.task_id, "error", reason, 0.0)
        result = self.sandbox.run(program)
        return Grade(problem.task_id, result.verdict, result.reason, result.seconds, result)

    def grade_canonical(self, problem: Problem) -> Grade:
        if problem.canonical_solution is None:
            return Grade(problem.task_id, "error", "the problem has no canonical_solution", 0.0)
        return self.grade(problem, problem.canonical_solution)

    def grade_many(self, items: Iterable[tuple[Problem, str | None]]) -> Iterator[Grade]:
        """Grades in input order; a None candidate grades the problem's canonical solution.
        At most ``2 * workers`` items are taken from ``items`` ahead of the one yielded."""
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="grader")
        pending: deque[Future[Grade]] = deque()
        try:
            for problem, candidate in items:
                if candidate is None:
                    pending.append(pool.submit(self.grade_canonical, problem))
                else:
                    pending.append(pool.submit(self.grade, problem, candidate))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
