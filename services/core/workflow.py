"""Drive a strategy by replaying its recorded stages.

A strategy is a generator: it yields a step (or a list of steps to run in parallel), gets
back the stage record(s), and finally returns an `Outcome`. To find out what a job does
next, `advance` re-runs the generator from the start, feeding it the records already
stored (replay is pure logic, no model calls), until it asks for a step that has no record
yet. Step i of a job always gets sequence number i, so a retried step rewrites its own
record instead of adding one: that is what makes stage writes idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass

from services.core.steps import Outcome, StageRecord, Step

Program = Generator[Step | list[Step], StageRecord | list[StageRecord], Outcome]
ProgramFactory = Callable[[], Program]


class ReplayMismatch(RuntimeError):
    """A stored record does not match the step the strategy asks for (the strategy changed)."""


@dataclass(frozen=True)
class Pending:
    """Steps to run now, each with its sequence number: the unrecorded part of one
    parallel group, whose sequence numbers are all in `group`."""

    steps: tuple[tuple[int, Step], ...]
    group: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    outcome: Outcome


def advance(program: ProgramFactory, recorded: Mapping[int, StageRecord]) -> Pending | Finished:
    generator = program()
    reply: StageRecord | list[StageRecord] | None = None
    seq = 0
    while True:
        try:
            request = generator.send(reply)
        except StopIteration as stop:
            return Finished(stop.value)
        steps = request if isinstance(request, list) else [request]
        numbered = [(seq + i, step) for i, step in enumerate(steps)]
        seq += len(steps)
        missing = tuple((n, step) for n, step in numbered if n not in recorded)
        if missing:
            generator.close()
            return Pending(missing, tuple(n for n, _ in numbered))
        records = [_checked(recorded[n], step) for n, step in numbered]
        reply = records if isinstance(request, list) else records[0]


def _checked(record: StageRecord, step: Step) -> StageRecord:
    if record.kind != step.kind:
        raise ReplayMismatch(
            f"stage {record.seq} was recorded as {record.kind!r} but the strategy now asks "
            f"for {step.kind!r}"
        )
    return record
