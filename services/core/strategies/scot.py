"""SCoT, speculative chain-of-thought (scot.md): the executor's small model drafts several
chains of thought at once, the coordinator's large model picks one with a single next-token
decision, then either finishes after the chosen draft or, if it rejects them all, solves the
problem from scratch.

1. Draft: `params.drafts` chains, one parallel group (the engine batches them and shares the
   prompt's cached prefix), temperature 0.6, a distinct seed each, stopping at the
   end-of-thinking marker or at `draft_max_tokens`.
2. Select: the coordinator reads the problem and every draft as `Reason k`, plus a last
   option `Reason n+1: all wrong`, and generates one token with its top-k log-probabilities.
   The choice is the most likely of the tokens "1".."n+1" among them; when none is there,
   the selection counts as a rejection and the summary says why.
3. Accept (1..n): the coordinator continues greedily after the chosen draft (its own prompt,
   the draft as the start of its reply) and writes the summary and final answer.
4. Reject (n+1): the coordinator solves alone, as in the llm_only baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from services.core.params import JobParams
from services.core.steps import Generate, StageRecord
from services.core.tasks import job_task
from services.core.workflow import Program

DRAFT_TEMPERATURE = 0.6  # the paper's drafting temperature, whatever the job's
END_OF_THINKING = "</think>"  # R1-style models close their reasoning with it
SELECTION_TOP_K = 20  # alternatives read at the selection's one token


@dataclass(frozen=True)
class Selection:
    """The coordinator's verdict: `choice` in 1..n+1 (n+1: every draft rejected)."""

    choice: int
    n_drafts: int
    reason: str  # how the choice was read, or why it fell back to rejecting
    logprob: float | None = None

    @property
    def selected(self) -> int | None:
        return self.choice if self.choice <= self.n_drafts else None


def scot(question: str, params: JobParams) -> Program:
    task = job_task(question, params)
    n = params.drafts
    base_seed = params.seed if params.seed is not None else 0
    drafts: list[StageRecord] = yield [
        Generate(
            role="executor",
            kind="draft",
            messages=task.solver_messages(),
            max_tokens=params.draft_max_tokens,
            stop=(END_OF_THINKING,),
            temperature=DRAFT_TEMPERATURE,
            top_p=params.top_p,
            seed=base_seed + k,
            note=f"draft {k + 1} of {n}",
        )
        for k in range(n)
    ]

    messages, cue = task.selection_messages([draft.text for draft in drafts])
    verdict = yield Generate(
        role="coordinator",
        kind="select",
        messages=messages,
        continuation=cue,
        max_tokens=1,
        top_logprobs=SELECTION_TOP_K,
        note=f"pick one of {n} drafts or reject all ({n + 1})",
    )
    selection = read_selection(verdict, n)

    if selection.selected is not None:
        chosen = drafts[selection.selected - 1]
        prefix = draft_prefix(chosen)
        record = yield Generate(
            role="coordinator",
            kind="finish",
            messages=task.solver_messages(),
            continuation=prefix,
            max_tokens=params.llm_max_tokens,
            note=f"finish after draft {selection.selected}",
        )
        final_text = prefix + record.text
        answer_from = (record.text, final_text)
    else:
        record = yield Generate(
            role="coordinator",
            kind="solve",
            messages=task.solver_messages(),
            max_tokens=params.llm_max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            note="all drafts rejected: coordinator solves alone",
        )
        final_text = record.text
        answer_from = (final_text,)

    summary: dict[str, Any] = {
        "selected": selection.selected,
        "rejected": selection.selected is None,
        "choice": selection.choice,
        "choice_logprob": selection.logprob,
        "selection_reason": selection.reason,
        "drafts": n,
        "draft_tokens": sum(draft.generated_tokens for draft in drafts),
    }
    return task.outcome(final_text, summary, answer_from)


def read_selection(record: StageRecord, n_drafts: int) -> Selection:
    """Map the selection step's one token to a choice in 1..n+1.

    The most likely of the tokens "1".."n+1" among the returned top-k alternatives wins
    (surrounding spaces ignored), so the choice is restricted to the valid options even
    when the greedy token is something else. Without top-k alternatives (an engine that
    returns none), the generated text itself is read. Anything else rejects every draft."""
    reject = n_drafts + 1
    tokens = record.output.get("tokens") or []
    top: dict[str, float] = dict(tokens[0].get("top") or {}) if tokens else {}
    if top:
        options = {}
        for text, logprob in top.items():
            number = _option(text, reject)
            if number is not None and logprob > options.get(number, -math.inf):
                options[number] = logprob
        if options:
            choice = max(options, key=lambda number: options[number])
            return Selection(choice, n_drafts, "most likely valid option", options[choice])
        return Selection(reject, n_drafts, f"no option 1..{reject} among the top-{len(top)}")
    number = _option(record.text, reject)
    if number is not None:
        return Selection(number, n_drafts, "generated token")
    return Selection(reject, n_drafts, f"output {record.text!r} is not an option 1..{reject}")


def _option(text: str, last: int) -> int | None:
    text = text.strip()
    if not text.isdigit():  # also refuses "" and non-ASCII digits like "²"
        return None
    number = int(text) if text.isascii() else -1
    return number if 1 <= number <= last else None


def draft_prefix(draft: StageRecord) -> str:
    """What the coordinator continues from: the chosen draft, closed with the
    end-of-thinking marker when the draft ended on its own (at the marker or the end of its
    sequence; the engines leave the stop string out of the text), so the coordinator writes
    the summary and answer rather than more reasoning. A draft cut at its length cap is
    continued as it stands."""
    if draft.finish_reason == "stop":
        return f"{draft.text.rstrip()}\n{END_OF_THINKING}\n\n"
    return draft.text

