"""Alembic environment: the URL comes from the caller's config (tandem db upgrade) or
TANDEM_DATABASE_URL (plain `alembic upgrade head` with alembic.ini).

On Postgres every upgrade runs in one transaction that first takes a transaction-level
advisory lock (MIGRATION_LOCK_KEY), so concurrent upgrades (the migration Job and the
migrate initContainer of every pod starting at once) take turns: the first builds the
schema, the others then find it at head and do nothing. A transaction-level lock, not a
session one, because the upgrade may go through PgBouncer in transaction pooling mode, where
a session lock would be taken on a server connection the next statement may not use.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from services.storage.models import Base

config = context.config
target_metadata = Base.metadata
if config.config_file_name:  # `alembic ...` with alembic.ini: its logging section
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# pg_advisory_xact_lock key of schema upgrades: the bytes of "tandem" as an integer.
MIGRATION_LOCK_KEY = 0x74616E64656D


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from services.settings import Settings

    return Settings().database_url


def connect_args(url: str) -> dict[str, object]:
    if not url.startswith("postgresql"):
        return {}
    from services.settings import Settings

    # Behind PgBouncer's transaction pooling no statement may stay prepared on the server.
    return {"prepare_threshold": None} if Settings().db_pooler == "pgbouncer" else {}


def run_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    url = database_url()
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args(url))
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        # One transaction for the lock and every migration (Alembic's default on Postgres):
        # the current revision is read after the lock is granted, i.e. after a concurrent
        # upgrade committed.
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
