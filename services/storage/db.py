"""Database engines, sessions and schema upgrades (Alembic, run programmatically)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")
_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def get_engine(url: str) -> Engine:
    """One pooled engine per URL per process."""
    with _lock:
        if url not in _engines:
            _engines[url] = _create(url)
        return _engines[url]


def _create(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    from services.settings import get_settings

    settings = get_settings()
    connect_args: dict[str, object] = {
        "connect_timeout": 3,
        # A network that goes silent (a cut link, no reset) must fail a statement in seconds,
        # not hang it until TCP gives up (minutes): data unacknowledged for 2 s closes the
        # connection (so the pool's ping fails and the API answers 503 at once), and
        # keepalives end a connection still waiting on an unreachable server
        # (tests/test_netns_faults.py).
        "tcp_user_timeout": 2000,
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
    }
    if settings.db_pooler == "pgbouncer":
        # Transaction pooling: the next transaction may run on another server connection,
        # where a statement psycopg prepared on the last one does not exist.
        connect_args["prepare_threshold"] = None
    return create_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_pre_ping=True,
        pool_timeout=5,
        connect_args=connect_args,
    )


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def dispose_engines() -> None:
    """Drop pooled connections (after fork, or between tests)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def transaction(url: str) -> Iterator[Session]:
    """A session whose work commits at the end of the block, or rolls back on error."""
    with session_factory(url).begin() as session:
        yield session


@contextmanager
def soft_transaction(url: str) -> Iterator[Session]:
    """A transaction whose commit does not wait for the WAL to reach disk (Postgres
    `synchronous_commit = off`): for lease starts and heartbeats, which a Postgres crash may
    roll back without harm (the lease is then started again). Stage records and job
    outcomes always commit durably (`transaction`)."""
    with transaction(url) as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SET LOCAL synchronous_commit = off"))
        yield session


def add_unless_taken(session: Session, row: object, taken: Callable[[], T | None]) -> T | None:
    """Insert `row` (in a savepoint); None once it is in. If a racing request took its
    idempotency key first, what `taken()` finds instead."""
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        earlier = taken()
        if earlier is None:
            raise
        return earlier
    return None


# SQLSTATEs of a transaction Postgres aborted only because of a concurrent one: deadlock
# victim (40P01), serialization failure (40001). Running it again is the documented cure.
_RETRYABLE_SQLSTATES = {"40P01", "40001"}


def in_transaction(url: str, work: Callable[[Session], T], attempts: int = 4) -> T:
    """`work(session)` in a transaction, run again (with a short random pause) when
    Postgres aborts it as a deadlock victim or on a serialization failure. `work` must be
    safe to repeat: everything it did in the aborted attempt was rolled back."""
    for attempt in range(attempts):
        try:
            with transaction(url) as session:
                return work(session)
        except DBAPIError as error:
            sqlstate = getattr(error.orig, "sqlstate", None)
            if sqlstate not in _RETRYABLE_SQLSTATES or attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.01, 0.05) * 2**attempt)
    raise AssertionError("unreachable")


def alembic_config(url: str):
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (builds an empty database from scratch)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
