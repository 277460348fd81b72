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


# --- concurrent upgrades ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def migration_lock_key() -> int:
    """MIGRATION_LOCK_KEY as migrations/env.py defines it (importing env.py runs Alembic)."""
    import re

    text = (ROOT / "migrations" / "env.py").read_text()
    match = re.search(r"^MIGRATION_LOCK_KEY = (0x[0-9A-Fa-f]+|\d+)$", text, re.M)
    assert match, "migrations/env.py defines no MIGRATION_LOCK_KEY"
    return int(match.group(1), 0)


def alembic_upgrade(url: str, tmp_path: Path, name: str, env: dict[str, str] | None = None):
    """`alembic upgrade head` as a user runs it, logging at INFO so that every migration it
    applies is printed ("Running upgrade ...")."""
    import os
    import subprocess
    import sys

    ini = tmp_path / f"{name}.ini"
    ini.write_text(
        (ROOT / "alembic.ini")
        .read_text()
        .replace("script_location = migrations", f"script_location = {ROOT / 'migrations'}")
        .replace("prepend_sys_path = .", f"prepend_sys_path = {ROOT}")
        .replace("level = WARNING", "level = INFO")
    )
    return subprocess.Popen(
        [sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head"],
        cwd=tmp_path,
        env={**os.environ, **(env or {}), "TANDEM_DATABASE_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_concurrent_upgrades(
    direct_url: str, upgrade_url: str, tmp_path: Path, env: dict[str, str] | None = None
) -> list[str]:
    """Start two `alembic upgrade head` on an empty database while the test holds the
    migration lock; once both wait on it, let go. Returns each one's output."""
    import time

    from sqlalchemy import text

    key = migration_lock_key()
    holder = create_engine(direct_url)
    procs = []
    try:
        with holder.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            connection.commit()
            procs = [alembic_upgrade(upgrade_url, tmp_path, f"u{i}", env) for i in range(2)]
            waiting = 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and waiting < 2:
                if any(p.poll() is not None for p in procs):
                    break  # an upgrade ended without waiting: no lock, or it failed
                waiting = connection.execute(
                    text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND NOT granted AND classid = :hi AND objid = :lo"
                    ),
                    {"hi": key >> 32, "lo": key & 0xFFFFFFFF},
                ).scalar_one()
                connection.commit()
                time.sleep(0.1)
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            connection.commit()
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        holder.dispose()
    assert waiting == 2, f"the upgrades did not wait on the migration lock:\n{outputs}"
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    return outputs


def test_concurrent_upgrades_take_turns_and_build_the_schema_once(
    postgres_admin_url: str, tmp_path: Path
) -> None:
    from tests import infra

    with infra.scratch_database(postgres_admin_url) as url:
        outputs = run_concurrent_upgrades(url, url, tmp_path)
        # One of them applied every migration; the other found the schema at head.
        ran = [out.count("Running upgrade") for out in outputs]
        assert sorted(ran) == [0, len(list((ROOT / "migrations" / "versions").glob("0*.py")))]
        assert differences(url) == []
