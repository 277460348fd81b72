"""Leases of running stages, many at once: what a worker process's heartbeat reads and
extends in one statement each (`services.jobs.heartbeat`)."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.orm import Session


class HeldStage(NamedTuple):
    """A stage a delivery holds: its job, its seq (as the leases' JSON keys it), its holder."""

    id: str
    seq: str
    holder: str


def held_stages(session: Session, stages: list[HeldStage]) -> dict[tuple[str, str], Any]:
    """For each stage, its job's status and cancel flag and its lease's holder now, keyed by
    (job id, seq); a stage whose job is gone is missing."""
    rows = session.execute(_STATE, {"stages": _json(stages)})
    return {(row.id, row.seq): row for row in rows}


def extend(session: Session, stages: list[HeldStage], deadline_s: float) -> None:
    """Push the leases of `stages` that their holders still hold one deadline ahead."""
    session.execute(_EXTEND, {"stages": _json(stages), "deadline": deadline_s})


def _json(stages: list[HeldStage]) -> str:
    return json.dumps([stage._asdict() for stage in stages])


# The watched stages' jobs, with the holder of each stage's lease now.
_STATE = text(
    """
    SELECT j.id, s.seq, j.status, j.cancel_requested, j.leases -> s.seq ->> 'holder' AS holder
    FROM jsonb_to_recordset(CAST(:stages AS jsonb)) AS s(id text, seq text, holder text)
    JOIN jobs AS j ON j.id = s.id
    """
)

# Push each still-held lease's `until` one deadline past the database clock (all of a job's
# stages in one change: SCoT's drafts run side by side), and the job's updated_at, which
# tells the reconciler it is alive. Rows are locked in id order, as a batch cancel locks
# them, so two multi-row updates cannot deadlock.
_EXTEND = text(
    """
    WITH stages AS (
        SELECT s.id, s.seq, s.holder
        FROM jsonb_to_recordset(CAST(:stages AS jsonb)) AS s(id text, seq text, holder text)
    ), locked AS (
        SELECT j.id, j.leases FROM jobs AS j
        WHERE j.id IN (SELECT id FROM stages) AND j.status = 'running' AND NOT j.cancel_requested
        ORDER BY j.id FOR UPDATE
    ), extended AS (
        SELECT locked.id, jsonb_object_agg(
            stages.seq,
            (locked.leases -> stages.seq) || jsonb_build_object(
                'until', extract(epoch FROM clock_timestamp()) + CAST(:deadline AS numeric)
            )
        ) AS patch
        FROM locked JOIN stages ON stages.id = locked.id
        WHERE locked.leases -> stages.seq ->> 'holder' = stages.holder
        GROUP BY locked.id
    )
    UPDATE jobs AS j
    SET leases = j.leases || extended.patch, updated_at = clock_timestamp()
    FROM extended
    WHERE j.id = extended.id
    """
)
