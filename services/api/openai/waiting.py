"""Waiting for a job without a busy loop: Postgres LISTEN/NOTIFY wake-ups, polling as the
safety net.

Migration 0006 adds a trigger that NOTIFYs channel `tandem_jobs` with a single job's id
whenever its row changes (a stage starts or is recorded, the job ends). Each API process
holds one listening connection (a daemon thread, started at the first wait) and wakes the
requests waiting on that job; a waiting request then reads the job again. Notifications
can be lost (the listener reconnecting: every waiter is woken when it is back) or
impossible (SQLite, or PgBouncer in transaction pooling mode, where LISTEN does not survive
a transaction), so a waiter also reads its job every 5 s while the listener is up, and on a
backoff from 50 ms to 1 s without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import make_url

log = logging.getLogger("tandem.api.openai")

CHANNEL = "tandem_jobs"
LISTENING_POLL_S = 5.0  # how often a waiter reads its job anyway while notifications arrive
POLL_FIRST_S, POLL_MAX_S = 0.05, 1.0  # the backoff without them


class JobEvents:
    """Wake-ups by job id for the requests of one process."""

    def __init__(self, database_url: str, pooler: str = "none") -> None:
        self._watchers: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self._thread: threading.Thread | None = None
        self._enabled = database_url.startswith("postgresql") and pooler != "pgbouncer"
        self._dsn = (
            make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
            if self._enabled
            else ""
        )

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    @contextmanager
    def watch(self, job_id: str) -> Iterator[threading.Event]:
        """An event set whenever the job changes (or the listener reconnected). Watch
        before reading the job, so a change between the read and the wait is not missed."""
        self._start()
        event = threading.Event()
        with self._lock:
            self._watchers.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                watchers = self._watchers.get(job_id)
                if watchers is not None:
                    watchers.discard(event)
                    if not watchers:
                        del self._watchers[job_id]

    def pause(self, attempt: int) -> float:
        """How long a wait may sleep before reading the job again."""
        if self.listening:
            return LISTENING_POLL_S
        return min(POLL_FIRST_S * 2**attempt, POLL_MAX_S)

    def _start(self) -> None:
        if not self._enabled or self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._listen, name="job-events", daemon=True)
                self._thread.start()

    def _wake(self, job_id: str | None) -> None:
        with self._lock:
            events = (
                [e for watchers in self._watchers.values() for e in watchers]
                if job_id is None
                else list(self._watchers.get(job_id, ()))
            )
        for event in events:
            event.set()

    def _listen(self) -> None:
        import psycopg

        backoff = 0.5
        while True:
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=3) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    self._wake(None)  # what changed while not listening: read again
                    backoff = 0.5
                    while True:
                        for notify in connection.notifies(timeout=5.0):
                            self._wake(notify.payload)
            except Exception as error:
                # Said once per outage, not at every retry.
                level = logging.WARNING if backoff == 0.5 else logging.DEBUG
                log.log(level, "job wake-ups lost (polling meanwhile): %s", str(error)[:200])
            finally:
                self._listening.clear()
                self._wake(None)
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
