"""Usage rollups: what deleted jobs cost, kept after their rows are gone.

Before a job is deleted (retention, or its owner's DELETE), its count and its stages' sums
are added to one row per (owner, hour it was created, strategy, final status), in the same
transaction as the delete: counted exactly once. Totals over a time window (the dashboard,
billing) are then what is still in `jobs`/`stages` plus these rows; a window's first hour
counts whole (the rollups know jobs by the hour only).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from services.storage import costs
from services.storage.costs import SUM_FIELDS, StageSums
from services.storage.models import Job, UsageRollup

ROLLUPS = UsageRollup.__table__
KEY = ("owner", "period_start", "strategy", "status")
COUNTED = ("jobs", *SUM_FIELDS)


def hour_of(moment: datetime) -> datetime:
    if moment.tzinfo is None:  # SQLite hands back naive UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def roll_up(session: Session, job_ids: Sequence[str]) -> int:
    """Add these jobs (deleted by the caller, in this transaction) to the rollups. Returns
    how many rollup rows were touched."""
    if not job_ids:
        return 0
    jobs = session.execute(
        select(Job.id, Job.owner, Job.strategy, Job.status, Job.created_at).where(
            Job.id.in_(job_ids)
        )
    ).all()
    sums = costs.by_job(session, [job.id for job in jobs])
    totals: dict[tuple, list[float]] = defaultdict(lambda: [0.0] * len(COUNTED))
    for job in jobs:
        key = (job.owner, hour_of(job.created_at), job.strategy, job.status)
        cost = sums.get(job.id, StageSums())
        row = totals[key]
        row[0] += 1
        for index, name in enumerate(SUM_FIELDS, start=1):
            row[index] += getattr(cost, name)
    if not totals:
        return 0
    values = [
        {**dict(zip(KEY, key, strict=True)), **_typed(row)} for key, row in totals.items()
    ]
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    statement = insert(ROLLUPS).values(values)
    statement = statement.on_conflict_do_update(
        index_elements=list(KEY),
        set_={name: ROLLUPS.c[name] + statement.excluded[name] for name in COUNTED},
    )
    session.execute(statement)
    return len(values)


def _typed(row: list[float]) -> dict[str, float | int]:
    return {
        name: (value if name in ("tflops", "prefill_tflops") else int(value))
        for name, value in zip(COUNTED, row, strict=True)
    }


def window(session: Session, owner: str, since: datetime) -> dict[tuple[str, str], list[float]]:
    """Rolled-up (strategy, status) -> [jobs, *SUM_FIELDS] of the owner's jobs created in the
    hours from `since`'s on."""
    rows = session.execute(
        select(
            UsageRollup.strategy,
            UsageRollup.status,
            *(func.sum(ROLLUPS.c[name]) for name in COUNTED),
        )
        .where(UsageRollup.owner == owner, UsageRollup.period_start >= hour_of(since))
        .group_by(UsageRollup.strategy, UsageRollup.status)
    )
    return {(strategy, status): [float(v or 0) for v in values] for strategy, status, *values in rows}


def as_sums(values: Sequence[float]) -> StageSums:
    """[jobs, *SUM_FIELDS] as StageSums (the jobs count left out)."""
    return StageSums.from_row(values[1:])


def plus(a: StageSums, b: StageSums) -> StageSums:
    return StageSums.from_row([getattr(a, n) + getattr(b, n) for n in SUM_FIELDS])
