"""Heartbeats: one thread per worker process watches every stage that process runs.

Every `tick_s` it reads, in one statement, whether each running stage's job was cancelled or
its lease taken over, and every third of the stage deadline it extends the leases it still
holds (and the jobs' `updated_at`, which is what the reconciler looks at). A stage is
stopped (its generation aborted where the engine allows) when:

- its job was cancelled or ended meanwhile ("cancelled"): the stage then finishes early and
  the job ends at this stage boundary;
- its lease was taken over ("lease lost"): its holder was presumed dead (it missed beats,
  e.g. cut off from Postgres) and the stage was granted to another delivery;
- it ran longer than `TANDEM_STAGE_TIMEOUT_S` ("timeout"): a hung model call fails this
  attempt instead of keeping its job running forever, and ends before a pod's termination
  grace runs out.

Beats are one transaction per process per tick, committed without waiting for the disk
(`soft_transaction`), so hundreds of concurrent stages cost a few statements a second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from services.storage import lease_rows
from services.storage.db import soft_transaction
from services.storage.statuses import ACTIVE_JOB_STATUSES

log = logging.getLogger("tandem.heartbeat")

CANCELLED, LEASE_LOST, TIMEOUT = "cancelled", "lease lost", "timeout"


@dataclass(eq=False)
class Watch:
    """One running stage, as its heartbeat sees it."""

    job_id: str
    seq: int
    holder: str
    abort: Callable[[], None]
    started: float = field(default_factory=time.monotonic)
    stopped: str | None = None  # CANCELLED, LEASE_LOST or TIMEOUT once stopped

    @property
    def stage(self) -> lease_rows.HeldStage:
        return lease_rows.HeldStage(self.job_id, str(self.seq), self.holder)

    def stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason
            try:
                self.abort()
            except Exception as error:  # the engine may not abort; the stage then runs out
                log.warning("abort failed: %s", error, extra={"job_id": self.job_id})


class Heartbeat:
    def __init__(self, url: str, deadline_s: float, timeout_s: float, tick_s: float = 5.0) -> None:
        self.url = url
        self.deadline_s = deadline_s
        self.timeout_s = timeout_s
        self.tick_s = min(tick_s, deadline_s / 3)
        self._extend_every_s = deadline_s / 3
        self._watches: set[Watch] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(
        self, job_id: str, seq: int, holder: str, abort: Callable[[], None]
    ) -> Iterator[Watch]:
        watch = Watch(job_id, seq, holder, abort)
        with self._lock:
            self._watches.add(watch)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
                self._thread.start()
        try:
            yield watch
        finally:
            with self._lock:
                self._watches.discard(watch)

    def _run(self) -> None:
        extended_at = time.monotonic()
        while True:
            time.sleep(self.tick_s)
            with self._lock:
                watches = list(self._watches)
            if not watches:
                continue  # the thread idles cheaply; a process runs stages all its life
            now = time.monotonic()
            for watch in watches:
                if now - watch.started > self.timeout_s:
                    watch.stop(TIMEOUT)
            extend = now - extended_at >= self._extend_every_s
            try:
                self.beat([w for w in watches if w.stopped is None], extend)
                extended_at = now if extend else extended_at
            except Exception as error:  # a missed beat is not fatal: the lease has slack
                log.warning("heartbeat failed: %s", error)

    def beat(self, watches: list[Watch], extend: bool) -> None:
        """Stop the watched stages whose job or lease is gone; with `extend`, push the
        leases still held one deadline ahead (database clock)."""
        if not watches:
            return
        with soft_transaction(self.url) as session:
            now = lease_rows.held_stages(session, [w.stage for w in watches])
            still = []
            for watch in watches:
                state = now.get((watch.job_id, str(watch.seq)))
                if (
                    state is None
                    or state.status not in ACTIVE_JOB_STATUSES
                    or state.cancel_requested
                ):
                    watch.stop(CANCELLED)
                elif state.holder != watch.holder:
                    watch.stop(LEASE_LOST)
                else:
                    still.append(watch.stage)
            if extend and still:
                lease_rows.extend(session, still, self.deadline_s)
