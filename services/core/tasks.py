"""Task types: what kind of answer a job wants, and the one place that maps a task to its
prompts and its answer extraction (`params.task`).

| task | the models are asked for | the job's answer |
|---|---|---|
| `math` (default) | reasoning ending in `\\boxed{}` | `answers.extract_answer`: the boxed (or last stated) value |
| `code` | one complete Python function in a ```python block | `answers.extract_code`: the function's source, with the imports and helpers it uses |
| `text` | a free-form answer | the final text itself (stripped); nothing is extracted |

`REGISTRY` maps each task to its wording (`prompts.MATH`, `CODE`, `TEXT`) and its reader. A
strategy asks `job_task(question, params)` for its prompts (`coordinator_messages`,
`executor_messages`, `solver_messages`, `selection_messages`) and turns its final text into
an `Outcome` with `outcome(...)`, so no strategy branches on the task.

**Code jobs.** The question is the function to write: HumanEval's `prompt` (imports,
signature and docstring), or prose. The function extracted is the one named
`params.entry_point`; without it, the last function the question defines at top level (in
HumanEval that is always the entry point; helpers come first); when the question defines
none (prose), the last function the reply defines at top level. The answer stored on the
job is that function's source; when none is found the answer is null and the outcome's
summary says why (`extraction`, e.g. "no function named add in the reply"). The code is
only parsed here, never run: grading runs in its own sandboxed process (services/grading,
used by `tandem eval` and `tandem classifier collect`), never in a service process.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from services.core import prompts
from services.core.answers import extract_answer, extract_code
from services.core.params import JobParams
from services.core.prompts import Messages, TaskPrompts
from services.core.steps import Outcome

TaskName = Literal["math", "code", "text"]
TASKS: tuple[TaskName, ...] = ("math", "code", "text")

_TOP_LEVEL_DEF = re.compile(r"^(?:async[ \t]+)?def[ \t]+([A-Za-z_]\w*)[ \t]*\(", re.M)


@dataclass(frozen=True)
class Answer:
    """What was read from a reply: the answer (None: nothing found) and, for code, where the
    function came from or why there is none."""

    value: str | None
    note: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"extraction": self.note} if self.note is not None else {}


@dataclass(frozen=True)
class Task:
    """A task type: its wording and how an answer is read from a reply (given the job)."""

    name: TaskName
    prompts: TaskPrompts
    read: Callable[[JobTask, str], Answer]


@dataclass(frozen=True)
class JobTask:
    """One job's task, bound to its question: the prompts to send and how to read the answer."""

    task: Task
    question: str
    entry_point: str | None = None  # code: the function to extract (None: see the docstring)

    @property
    def name(self) -> TaskName:
        return self.task.name

    @property
    def prompts(self) -> TaskPrompts:
        return self.task.prompts

    def coordinator_messages(self) -> Messages:
        return self.prompts.coordinator_messages(self.question)

    def executor_messages(self, insights: str = "") -> Messages:
        return self.prompts.executor_messages(self.question, insights)

    def solver_messages(self) -> Messages:
        return self.prompts.solver_messages(self.question)

    def selection_messages(self, drafts: list[str]) -> tuple[Messages, str]:
        return self.prompts.selection_messages(self.question, drafts)

    def answer(self, *texts: str) -> Answer:
        """The answer of the first text that has one (e.g. SCoT: the coordinator's
        continuation, then draft + continuation); else the last text's reading."""
        found = Answer(None)
        for text in texts:
            found = self.task.read(self, text)
            if found.value is not None:
                return found
        return found

    def outcome(
        self,
        final_text: str,
        summary: dict[str, Any] | None = None,
        answer_from: tuple[str, ...] | None = None,
    ) -> Outcome:
        """The strategy's result: the answer read from `answer_from` (default: the final
        text), the final text, and the summary (plus, for code, `extraction`)."""
        answer = self.answer(*(answer_from if answer_from is not None else (final_text,)))
        return Outcome(
            answer=answer.value, final_text=final_text, summary={**(summary or {}), **answer.summary()}
        )


def _math_answer(task: JobTask, text: str) -> Answer:
    return Answer(extract_answer(text))


def _text_answer(task: JobTask, text: str) -> Answer:
    return Answer(text.strip() or None)


def _code_answer(task: JobTask, text: str) -> Answer:
    entry_point = task.entry_point or last_function(text)
    if entry_point is None:
        return Answer(None, "no function defined in the reply" if text.strip() else "empty reply")
    code = extract_code(text, entry_point)
    return Answer(code.code, f"{entry_point}: {code.reason}")


# The one place a task name maps to its prompts and its answer extraction.
REGISTRY: dict[str, Task] = {
    "math": Task("math", prompts.MATH, _math_answer),
    "code": Task("code", prompts.CODE, _code_answer),
    "text": Task("text", prompts.TEXT, _text_answer),
}


def last_function(source: str) -> str | None:
    """The name of the last function defined at the start of a line (top level), or None."""
    names = _TOP_LEVEL_DEF.findall(source)
    return names[-1] if names else None


def job_task(question: str, params: JobParams) -> JobTask:
    """The task of a job: its prompts, and its answer extraction bound to the question."""
    entry_point = None
    if params.task == "code":
        entry_point = params.entry_point or last_function(question)
    return JobTask(REGISTRY[params.task], question, entry_point)
