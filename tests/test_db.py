"""Transactions that Postgres aborts as deadlock victims are run again, on a real server."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from services.storage.db import get_engine, in_transaction


@pytest.fixture
def probe_table(database_url: str):
    table = f"deadlock_probe_{uuid.uuid4().hex[:8]}"
    with get_engine(database_url).begin() as connection:
        connection.execute(text(f"CREATE TABLE {table} (id int PRIMARY KEY)"))
        connection.execute(text(f"INSERT INTO {table} VALUES (1), (2)"))
    yield table
    with get_engine(database_url).begin() as connection:
        connection.execute(text(f"DROP TABLE {table}"))


def lock(session_or_connection, table: str, row: int) -> None:
    session_or_connection.execute(text(f"SELECT id FROM {table} WHERE id = {row} FOR UPDATE"))


def test_a_deadlock_victim_is_run_again(database_url: str, probe_table: str) -> None:
    first_lock_held = threading.Event()
    other_holds_two = threading.Event()
    attempts: list[int] = []

    def other() -> None:  # locks 2 then 1: the opposite order, and waits out the victim
        with get_engine(database_url).begin() as connection:
            connection.execute(text("SET LOCAL deadlock_timeout = '10s'"))
            lock(connection, probe_table, 2)
            other_holds_two.set()
            first_lock_held.wait(10)
            lock(connection, probe_table, 1)

    def work(session) -> str:
        attempts.append(1)
        session.execute(text("SET LOCAL deadlock_timeout = '100ms'"))  # we detect: the victim
        lock(session, probe_table, 1)
        first_lock_held.set()
        other_holds_two.wait(10)
        lock(session, probe_table, 2)
        return "done"

    thread = threading.Thread(target=other)
    thread.start()
    other_holds_two.wait(10)
    assert in_transaction(database_url, work) == "done"
    thread.join(10)
    assert len(attempts) == 2  # the first was the deadlock victim


def test_other_database_errors_are_not_retried(database_url: str) -> None:
    attempts: list[int] = []

    def work(session) -> None:
        attempts.append(1)
        session.execute(text("SELECT * FROM no_such_table"))

    with pytest.raises(DBAPIError):
        in_transaction(database_url, work)
    assert len(attempts) == 1
