"""OpenAI surface: files and their chunks, OpenAI batch columns, job wake-ups

- `files` / `file_chunks`: the Files API's files, their bytes in 1 MiB bytea rows;
- `batches`: which API created a batch, and an OpenAI batch's input file, endpoint,
  completion window, expiry, output and error files and the client's metadata;
- Postgres only: a trigger that NOTIFYs `tandem_jobs` with a single job's id whenever its
  row changes (a stage recorded, the job finished), so an API process waiting for a chat
  completion wakes at once instead of polling. Batch jobs do not notify.

Revision ID: 0006
Revises: 0004 (the lead re-chains it after 0005 at merge)
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION tandem_notify_job() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('tandem_jobs', NEW.id);
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""
NOTIFY_TRIGGER = """
CREATE TRIGGER jobs_notify AFTER UPDATE ON jobs
FOR EACH ROW WHEN (NEW.batch_id IS NULL) EXECUTE FUNCTION tandem_notify_job()
"""


def upgrade() -> None:
    json_type = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
    op.create_table(
        "files",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("batch_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files")),
    )
    op.create_index("ix_files_owner_created", "files", ["owner", "created_at", "id"])
    op.create_table(
        "file_chunks",
        sa.Column("file_id", sa.String(length=40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["file_id"],
            ["files.id"],
            name=op.f("fk_file_chunks_file_id_files"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("file_id", "seq", name=op.f("pk_file_chunks")),
    )
    with op.batch_alter_table("batches") as batch:
        batch.add_column(
            sa.Column("api", sa.String(length=16), server_default="native", nullable=False)
        )
        batch.add_column(sa.Column("input_file_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("endpoint", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("completion_window", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("output_file_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("error_file_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("user_metadata", json_type, nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(NOTIFY_FUNCTION)
        op.execute(NOTIFY_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS jobs_notify ON jobs")
        op.execute("DROP FUNCTION IF EXISTS tandem_notify_job()")
    with op.batch_alter_table("batches") as batch:
        for column in (
            "user_metadata",
            "error_file_id",
            "output_file_id",
            "expired_at",
            "expires_at",
            "completion_window",
            "endpoint",
            "input_file_id",
            "api",
        ):
            batch.drop_column(column)
    op.drop_table("file_chunks")
    op.drop_index("ix_files_owner_created", table_name="files")
    op.drop_table("files")
