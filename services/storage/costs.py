"""Cost sums over stage records, computed in Postgres: per job, per batch, or over any set
of jobs. One shape (`StageSums`) for every total the API shows; `services.core.cost` holds
the per-stage formulas these rows were written with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.storage.models import Job, Stage

SUM_FIELDS = ("tflops", "prefill_tflops", "prompt_tokens", "cached_prompt_tokens", "generated_tokens")


@dataclass(frozen=True)
class StageSums:
    tflops: float | int = 0
    prefill_tflops: float | int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0

    @classmethod
    def from_row(cls, values: Sequence[Any]) -> StageSums:
        return cls(*(_number(value) for value in values))

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _number(value: Any) -> float | int:
    number = float(value or 0)
    return int(number) if number.is_integer() else round(number, 9)


def _sums() -> list[Any]:
    return [func.coalesce(func.sum(getattr(Stage, name)), 0) for name in SUM_FIELDS]


def over_jobs(session: Session, *where: Any) -> StageSums:
    """The stages of every job matching `where`, summed."""
    row = session.execute(select(*_sums()).join(Job, Job.id == Stage.job_id).where(*where)).one()
    return StageSums.from_row(row)


def by_job(session: Session, job_ids: Sequence[str]) -> dict[str, StageSums]:
    if not job_ids:
        return {}
    rows = session.execute(
        select(Stage.job_id, *_sums()).where(Stage.job_id.in_(job_ids)).group_by(Stage.job_id)
    )
    return {job_id: StageSums.from_row(values) for job_id, *values in rows}


def by_batch(session: Session, batch_ids: Sequence[str]) -> dict[str, StageSums]:
    if not batch_ids:
        return {}
    rows = session.execute(
        select(Job.batch_id, *_sums())
        .join(Stage, Stage.job_id == Job.id)
        .where(Job.batch_id.in_(batch_ids))
        .group_by(Job.batch_id)
    )
    return {batch_id: StageSums.from_row(values) for batch_id, *values in rows}


def by_strategy(session: Session, *where: Any) -> list[tuple[str, int, StageSums]]:
    """(strategy, jobs, sums) for the jobs matching `where`, by strategy name."""
    jobs = select(Job.id, Job.strategy).where(*where).subquery()
    rows = session.execute(
        select(jobs.c.strategy, func.count(func.distinct(jobs.c.id)), *_sums())
        .join(Stage, Stage.job_id == jobs.c.id)
        .group_by(jobs.c.strategy)
        .order_by(jobs.c.strategy)
    )
    return [(strategy, int(n), StageSums.from_row(values)) for strategy, n, *values in rows]


def latest_succeeded(
    session: Session, owner: str, strategy: str, question: str
) -> tuple[str, StageSums] | None:
    """The owner's most recent succeeded job of `strategy` on exactly this question, with its
    cost (the dashboard's measured baseline)."""
    row = session.execute(
        select(Job.id, *_sums())
        .join(Stage, Stage.job_id == Job.id)
        .where(
            Job.owner == owner,
            Job.strategy == strategy,
            Job.status == "succeeded",
            Job.question == question,
        )
        .group_by(Job.id, Job.finished_at)
        .order_by(Job.finished_at.desc())
        .limit(1)
    ).first()
    return (row[0], StageSums.from_row(row[1:])) if row else None
