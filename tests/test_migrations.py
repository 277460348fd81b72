"""The schema comes only from Alembic: `upgrade head` on an empty database builds exactly
what the models describe, on Postgres (service mode) and SQLite (embedded mode)."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from services.storage.db import upgrade
from services.storage.models import Base


def differences(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_postgres_migrations_match_models(database_url: str) -> None:
    # `database_url` was built by `upgrade head` on an empty database.
    assert differences(database_url) == []
    engine = create_engine(database_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"jobs", "stages", "batches", "api_keys", "alembic_version"} <= tables


def test_sqlite_migrations_match_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    upgrade(url)
    assert differences(url) == []


def test_upgrade_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'twice.db'}"
    upgrade(url)
    upgrade(url)
    assert differences(url) == []
