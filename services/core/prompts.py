"""Every prompt the strategies send, in one place.

Prompts are built as chat messages; the backend that runs a step renders them with its
own model's chat template, so a step can be planned in one process and run in another.
"""

from __future__ import annotations

import re

Messages = tuple[dict[str, str], ...]

GPRA_PARTS: tuple[tuple[str, str], ...] = (
    ("Goal", "the objective, its constraints, and the form the answer must take"),
    ("Planning", "the strategy: how to break the problem down, and edge cases to watch"),
    ("Retrieval", "facts, formulas or definitions the solution needs (or N/A)"),
    ("Action", "concrete first steps and intermediate results"),
)

ANSWER_FORMAT = "Put the final answer in \\boxed{}."

COORDINATOR_SYSTEM = (
    "You are the coordinator of a two-model team. You do not solve the problem to the end: "
    "you write the critical thinking insights that let a smaller model solve it. "
    "Write them in four labelled parts, most important first:\n"
    + "\n".join(f"{name}: {gloss}." for name, gloss in GPRA_PARTS)
    + "\nBe concise and concrete."
)

EXECUTOR_SYSTEM = "You are a careful problem solver. Reason step by step, then answer."

SOLVER_SYSTEM = "You are a careful problem solver. Reason step by step, then answer."

_THINK_TAGS = re.compile(r"</?think>")


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def coordinator_messages(question: str) -> Messages:
    """The coordinator's prompt; its reply (the insight stream) is cut at each budget."""
    return (
        system(COORDINATOR_SYSTEM),
        user(
            f"Problem:\n{question}\n\nWrite the thinking insights (Goal, Planning, Retrieval, Action)."
        ),
    )


def strip_thinking_tags(insights: str) -> str:
    return _THINK_TAGS.sub("", insights).strip()


def executor_messages(question: str, insights: str = "") -> Messages:
    """The executor's prompt: the question, plus the coordinator's insights when there are any."""
    insights = strip_thinking_tags(insights)
    if not insights:
        return (system(EXECUTOR_SYSTEM), user(f"{question}\n\n{ANSWER_FORMAT}"))
    glossary = "\n".join(f"- {name}: {gloss}" for name, gloss in GPRA_PARTS)
    return (
        system(EXECUTOR_SYSTEM),
        user(
            f"{question}\n\n[Thinking Insights]\n"
            f"A stronger model started on this problem. Its insights may cover:\n{glossary}\n\n"
            f"{insights}\n\n"
            f"Use the insights, check them, finish the reasoning yourself. {ANSWER_FORMAT}"
        ),
    )


def solver_messages(question: str) -> Messages:
    """A model answering alone (the llm_only and slm_only baselines)."""
    return (system(SOLVER_SYSTEM), user(f"{question}\n\n{ANSWER_FORMAT}"))


SELECTION_INSTRUCTION = (
    "Several reasoning paths were written for the problem below. Judge which one reasons "
    "best towards a correct answer, and reply with the number of that path only."
)
SELECTION_CUE = "Number of the best reasoning path: "


def selection_messages(question: str, drafts: list[str]) -> tuple[Messages, str]:
    """SCoT's selection prompt: the problem, each draft as `Reason k`, a last option saying
    every path is wrong, and the cue the reply starts with (its next token is the choice)."""
    paths = [f"Reason {k}: {draft.strip()}" for k, draft in enumerate(drafts, start=1)]
    paths.append(f"Reason {len(drafts) + 1}: All reasoning paths above are wrong.")
    body = f"{SELECTION_INSTRUCTION}\n\nProblem:\n{question}\n\n" + "\n\n".join(paths)
    return (user(body),), SELECTION_CUE


def classifier_text(question: str, hint: str = "") -> str:
    """The text the feature model scores (tandem.md: the Hint part is left out at stage 0)."""
    hint = strip_thinking_tags(hint)
    if not hint:
        return f"Question: {question}\n\nAnswer:"
    return f"Question: {question}\n\nHint: {hint}\n\nAnswer:"
