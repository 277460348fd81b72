"""tandem_lock_job(id): lock a job's row, then read its stage records, in one round trip

A stage transaction's first step. The two reads are two statements inside the function, so
under READ COMMITTED the records are read with a snapshot taken after the lock was granted:
they include everything the previous holder of the lock committed (one statement joining
the two would re-check the locked job row only, and miss those records). Postgres only; the
embedded SQLite database runs no stage transactions.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

FUNCTION = """
CREATE OR REPLACE FUNCTION tandem_lock_job(p_id text)
RETURNS TABLE (
    id text, status text, cancel_requested boolean, leases jsonb, error text,
    batch_id text, question text, strategy text, params jsonb, created double precision,
    now double precision, records jsonb
)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    job jobs%ROWTYPE;
    found_records jsonb;
BEGIN
    SELECT * INTO job FROM jobs WHERE jobs.id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Its own statement: a snapshot taken now that the lock is held.
    SELECT coalesce(
               jsonb_agg(to_jsonb(s) - 'id' - 'job_id' - 'created_at' ORDER BY s.seq),
               '[]'::jsonb)
      INTO found_records
      FROM stages AS s WHERE s.job_id = p_id;
    RETURN QUERY SELECT
        job.id::text, job.status::text, job.cancel_requested, job.leases::jsonb,
        job.error, job.batch_id::text, job.question, job.strategy::text, job.params::jsonb,
        extract(epoch FROM job.created_at)::double precision,
        extract(epoch FROM clock_timestamp())::double precision, found_records;
END
$$;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS tandem_lock_job(text)")
