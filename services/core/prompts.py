"""Every prompt the strategies send, in one place.

Prompts are built as chat messages; the backend that runs a step renders them with its
own model's chat template, so a step can be planned in one process and run in another.

Each task type (`params.task`, see `tasks.py`) has its own wording in a `TaskPrompts`:
`MATH` (the module-level functions below; their text is what every math result so far was
measured with, so it does not change), `CODE` (the executor writes one Python function;
the GPRA insights become goal, plan, the APIs and edge cases needed, steps) and `TEXT` (a
free-form answer). The classifier's scoring text (`classifier_text`) is the same for every
task: a trained classifier reads the same features whatever the task, which is what lets
one trained on math be tried on code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Messages = tuple[dict[str, str], ...]

GPRA_PARTS: tuple[tuple[str, str], ...] = (
    ("Goal", "the objective, its constraints, and the form the answer must take"),
    ("Planning", "the strategy: how to break the problem down, and edge cases to watch"),
    ("Retrieval", "facts, formulas or definitions the solution needs (or N/A)"),
    ("Action", "concrete first steps and intermediate results"),
)

ANSWER_FORMAT = "Put the final answer in \\boxed{}."

EXECUTOR_SYSTEM = "You are a careful problem solver. Reason step by step, then answer."

SOLVER_SYSTEM = "You are a careful problem solver. Reason step by step, then answer."

_THINK_TAGS = re.compile(r"</?think>")
_DEF = re.compile(r"^(?:async[ \t]+)?def[ \t]+\w+[ \t]*\(", re.M)


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def _fenced_when_code(question: str) -> str:
    """A code task's question as the models see it: a signature and docstring (HumanEval's
    `prompt`) inside a Python fence, prose as it is."""
    if _DEF.search(question):
        return f"Complete this Python function:\n```python\n{question.strip()}\n```"
    return question


def _as_is(question: str) -> str:
    return question


@dataclass(frozen=True)
class TaskPrompts:
    """One task's wording. Every message is assembled from these parts by the methods, so the
    three tasks share one shape (and math keeps its exact text)."""

    gpra_parts: tuple[tuple[str, str], ...]
    coordinator_lead: str  # the coordinator's role, before the GPRA list
    executor_system: str
    solver_system: str
    answer_format: str  # appended to the executor's and solver's request ("" for none)
    problem_header: str  # "Problem", "Task", "Question"
    insights_intro: str  # before the glossary, in the executor's prompt
    insights_closing: str  # after the insights, before the answer format
    selection_instruction: str
    selection_label: str  # each draft is shown as "<label> k: ..."
    selection_reject: str  # the last option
    selection_cue: str
    present: Callable[[str], str] = _as_is  # the question as the models read it

    @property
    def coordinator_system(self) -> str:
        return (
            self.coordinator_lead
            + "Write them in four labelled parts, most important first:\n"
            + "\n".join(f"{name}: {gloss}." for name, gloss in self.gpra_parts)
            + "\nBe concise and concrete."
        )

    def coordinator_messages(self, question: str) -> Messages:
        """The coordinator's prompt; its reply (the insight stream) is cut at each budget."""
        return (
            system(self.coordinator_system),
            user(
                f"{self.problem_header}:\n{self.present(question)}\n\n"
                "Write the thinking insights (Goal, Planning, Retrieval, Action)."
            ),
        )

    def executor_messages(self, question: str, insights: str = "") -> Messages:
        """The executor's prompt: the question, plus the coordinator's insights when there
        are any."""
        insights = strip_thinking_tags(insights)
        shown = self.present(question)
        if not insights:
            return (system(self.executor_system), user(_then(shown, self.answer_format)))
        glossary = "\n".join(f"- {name}: {gloss}" for name, gloss in self.gpra_parts)
        return (
            system(self.executor_system),
            user(
                f"{shown}\n\n[Thinking Insights]\n"
                f"{self.insights_intro}\n{glossary}\n\n"
                f"{insights}\n\n"
                + " ".join(part for part in (self.insights_closing, self.answer_format) if part)
            ),
        )

    def solver_messages(self, question: str) -> Messages:
        """A model answering alone (the baselines, SCoT's drafts, relay)."""
        return (system(self.solver_system), user(_then(self.present(question), self.answer_format)))

    def selection_messages(self, question: str, drafts: Sequence[str]) -> tuple[Messages, str]:
        """SCoT's selection prompt: the problem, each draft as `<label> k`, a last option
        rejecting them all, and the cue the reply starts with (its next token is the choice)."""
        label = self.selection_label
        paths = [f"{label} {k}: {draft.strip()}" for k, draft in enumerate(drafts, start=1)]
        paths.append(f"{label} {len(drafts) + 1}: {self.selection_reject}")
        body = (
            f"{self.selection_instruction}\n\n{self.problem_header}:\n"
            f"{self.present(question)}\n\n" + "\n\n".join(paths)
        )
        return (user(body),), self.selection_cue


def _then(text: str, answer_format: str) -> str:
    return f"{text}\n\n{answer_format}" if answer_format else text


MATH = TaskPrompts(
    gpra_parts=GPRA_PARTS,
    coordinator_lead=(
        "You are the coordinator of a two-model team. You do not solve the problem to the end: "
        "you write the critical thinking insights that let a smaller model solve it. "
    ),
    executor_system=EXECUTOR_SYSTEM,
    solver_system=SOLVER_SYSTEM,
    answer_format=ANSWER_FORMAT,
    problem_header="Problem",
    insights_intro="A stronger model started on this problem. Its insights may cover:",
    insights_closing="Use the insights, check them, finish the reasoning yourself.",
    selection_instruction=(
        "Several reasoning paths were written for the problem below. Judge which one reasons "
        "best towards a correct answer, and reply with the number of that path only."
    ),
    selection_label="Reason",
    selection_reject="All reasoning paths above are wrong.",
    selection_cue="Number of the best reasoning path: ",
)
COORDINATOR_SYSTEM = MATH.coordinator_system

CODE_GPRA_PARTS: tuple[tuple[str, str], ...] = (
    ("Goal", "what the function must return for its inputs, and the constraints it must keep"),
    ("Planning", "the algorithm: how to break the task down"),
    (
        "Retrieval",
        "the Python built-ins, library functions and data structures it needs, and the edge "
        "cases to handle (empty input, ties, negatives, ...)",
    ),
    ("Action", "the concrete steps of the implementation, in order"),
)

CODE_SYSTEM = "You are a careful Python programmer. Think the task through, then write the code."

CODE = TaskPrompts(
    gpra_parts=CODE_GPRA_PARTS,
    coordinator_lead=(
        "You are the coordinator of a two-model team. You do not write the code: "
        "you write the critical thinking insights that let a smaller model write it. "
    ),
    executor_system=CODE_SYSTEM,
    solver_system=CODE_SYSTEM,
    answer_format=(
        "Write the complete function, signature included, with the imports it needs, "
        "in one ```python code block."
    ),
    problem_header="Task",
    insights_intro="A stronger model started on this task. Its insights may cover:",
    insights_closing="Use the insights, check them, and write the function yourself.",
    selection_instruction=(
        "Several candidate solutions were written for the programming task below. Judge which "
        "one is most likely correct, and reply with the number of that solution only."
    ),
    selection_label="Solution",
    selection_reject="All solutions above are wrong.",
    selection_cue="Number of the best solution: ",
    present=_fenced_when_code,
)

TEXT_GPRA_PARTS: tuple[tuple[str, str], ...] = (
    ("Goal", "what the answer must achieve, and the form it should take"),
    ("Planning", "how to structure the answer, and the pitfalls to avoid"),
    ("Retrieval", "facts, definitions or sources the answer needs (or N/A)"),
    ("Action", "the key points to make, in order"),
)

TEXT_SYSTEM = "You are a careful assistant. Answer accurately and to the point."

TEXT = TaskPrompts(
    gpra_parts=TEXT_GPRA_PARTS,
    coordinator_lead=(
        "You are the coordinator of a two-model team. You do not write the answer: "
        "you write the critical thinking insights that let a smaller model write it. "
    ),
    executor_system=TEXT_SYSTEM,
    solver_system=TEXT_SYSTEM,
    answer_format="",
    problem_header="Question",
    insights_intro="A stronger model started on this question. Its insights may cover:",
    insights_closing="Use the insights, check them, and write the answer yourself.",
    selection_instruction=(
        "Several answers were written for the question below. Judge which one answers it "
        "best, and reply with the number of that answer only."
    ),
    selection_label="Answer",
    selection_reject="All answers above are poor.",
    selection_cue="Number of the best answer: ",
)


# The math prompts under their historical names (the default task).


def coordinator_messages(question: str) -> Messages:
    """The coordinator's prompt; its reply (the insight stream) is cut at each budget."""
    return MATH.coordinator_messages(question)


def strip_thinking_tags(insights: str) -> str:
    return _THINK_TAGS.sub("", insights).strip()


def executor_messages(question: str, insights: str = "") -> Messages:
    """The executor's prompt: the question, plus the coordinator's insights when there are any."""
    return MATH.executor_messages(question, insights)


def solver_messages(question: str) -> Messages:
    """A model answering alone (the llm_only and slm_only baselines)."""
    return MATH.solver_messages(question)


SELECTION_INSTRUCTION = MATH.selection_instruction
SELECTION_CUE = MATH.selection_cue


def selection_messages(question: str, drafts: list[str]) -> tuple[Messages, str]:
    """SCoT's selection prompt: the problem, each draft as `Reason k`, a last option saying
    every path is wrong, and the cue the reply starts with (its next token is the choice)."""
    return MATH.selection_messages(question, drafts)


def classifier_text(question: str, hint: str = "") -> str:
    """The text the feature model scores (tandem.md: the Hint part is left out at stage 0)."""
    hint = strip_thinking_tags(hint)
    if not hint:
        return f"Question: {question}\n\nAnswer:"
    return f"Question: {question}\n\nHint: {hint}\n\nAnswer:"
