"""Stage delivery under interleavings (issue 21): leases, tokens, fencing, the database's clock.

Real Postgres and the real default model; each test drives `run_stage` (what the Celery task
runs) from threads, injects pauses around the lock, the commit and the publish, and counts
model calls (`Calls`) as well as stage records. Queue messages are collected in an `Outbox`
instead of Redis, so a test decides when (and how often) each one is delivered.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import select, text, update

from services import jobs
from services.core.engines import Engines
from services.core.requests import parse_job_request
from services.jobs import StageContext, StageTask, run_stage
from services.jobs import record as record_module
from services.jobs import stage as stage_module
from services.jobs.heartbeat import Heartbeat
from services.jobs.reconcile import reconcile
from services.observability import WASTED
from services.storage import stage_rows
from services.storage.db import transaction
from services.storage.models import Job, Stage

PARAMS = {"budgets": [0, 8, 16], "executor_max_tokens": 8, "cost_preference": "quality"}
SCOT = {"drafts": 2, "draft_max_tokens": 4, "llm_max_tokens": 4}


@pytest.fixture(autouse=True)
def _isolated(in_process_settings) -> Iterator[None]:
    """Each test's reconciler passes see only that test's jobs: end the others' after it."""
    yield
    from tests import infra

    infra.end_unfinished_work(in_process_settings.database_url, None)


@pytest.fixture(scope="module")
def engines(in_process_settings) -> Iterator[Engines]:
    from services.settings import Settings

    engines = Engines(Settings(local_threads=1))
    yield engines
    engines.close()


class Calls:
    """Model calls of the stages run in this process, by (job, seq), around the real
    `execute`; `hook(job_id, seq)` runs before each."""

    def __init__(self) -> None:
        self.count: Counter[tuple[str, int]] = Counter()
        self.hook: Callable[[str, int], None] | None = None
        self._lock = threading.Lock()

    def of(self, job_id: str) -> int:
        return sum(n for (job, _), n in self.count.items() if job == job_id)


@pytest.fixture
def calls(monkeypatch) -> Calls:
    counted = Calls()
    real = stage_module.execute

    def execute(seq, step, engines, params, attempt=1, request_id=None, **options):  # type: ignore[no-untyped-def]
        job_id = request_id.split(":")[0]
        with counted._lock:
            counted.count[(job_id, seq)] += 1
        if counted.hook is not None:
            counted.hook(job_id, seq)
        return real(seq, step, engines, params, attempt=attempt, request_id=request_id, **options)

    monkeypatch.setattr(stage_module, "execute", execute)
    return counted


class Outbox(list):
    """What Redis would hold: every task published, in order."""

    def __call__(self, tasks) -> None:  # type: ignore[no-untyped-def]
        self.extend(tasks)


def context_for(settings, engines: Engines, outbox: Outbox | None = None, **changes: Any):
    settings = settings.model_copy(update=changes) if changes else settings
    heartbeat = Heartbeat(
        settings.database_url, settings.stage_deadline_s, settings.stage_timeout_s, tick_s=0.2
    )
    return StageContext(settings, engines, heartbeat, outbox)


@pytest.fixture
def outbox() -> Outbox:
    return Outbox()


@pytest.fixture
def context(in_process_settings, engines, outbox) -> StageContext:
    return context_for(in_process_settings, engines, outbox)


def submit(settings, strategy: str = "tandem", params: dict | None = None) -> list[StageTask]:
    request = parse_job_request(
        {"question": "What is 17 + 25?", "strategy": strategy, "params": params or PARAMS}, 8000
    )
    with transaction(settings.database_url) as session:
        _job, tasks, created = jobs.submit(session, "delivery-tests", request)
    assert created
    return tasks


def deliver(context: StageContext, task: StageTask) -> list[StageTask]:
    return run_stage(context, task.job_id, task.seq, task.grant)


def drive(context: StageContext, outbox: Outbox, tasks: list[StageTask]) -> None:
    """Deliver every message once, in order, until none is left (a quiet queue)."""
    pending = list(tasks)
    while pending or outbox:
        pending += outbox
        outbox.clear()
        task = pending.pop(0)
        pending += deliver(context, task)


def stage_seqs(settings, job_id: str) -> list[int]:
    with transaction(settings.database_url) as session:
        query = select(Stage.seq).where(Stage.job_id == job_id).order_by(Stage.seq)
        return list(session.scalars(query))


def job_row(settings, job_id: str) -> Job:
    with transaction(settings.database_url) as session:
        return session.get_one(Job, job_id)


def wasted(reason: str) -> float:
    return WASTED.labels(reason)._value.get()


def in_threads(*targets: Callable[[], Any]) -> list[Any]:
    """Run the targets at once (released together by a barrier); their results in order."""
    barrier = threading.Barrier(len(targets))
    results: list[Any] = [None] * len(targets)

    def run(index: int, target: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[index] = target()
        except BaseException as error:  # surfaced to the test below
            results[index] = error

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


# --- the path ---------------------------------------------------------------------------


def test_a_job_runs_to_the_end_on_its_messages(in_process_settings, context, outbox, calls):
    settings = in_process_settings
    first = submit(settings)
    [task] = first
    assert task.grant is not None and task.queue == "classifier"
    assert job_row(settings, task.job_id).leases["0"]["token"] == task.grant.token
    drive(context, outbox, first)
    job = job_row(settings, task.job_id)
    assert job.status == "succeeded" and job.leases == {}
    recorded = stage_seqs(settings, task.job_id)
    assert calls.of(task.job_id) == len(recorded)  # nothing ran that was not recorded
    assert job.attempts == len(recorded)


def test_the_next_stage_is_published_before_the_commit(in_process_settings, engines, calls):
    settings = in_process_settings
    [first] = submit(settings)
    seen: list[list[int]] = []
    published: list[StageTask] = []

    def enqueue(tasks) -> None:  # type: ignore[no-untyped-def]
        seen.append(stage_seqs(settings, first.job_id))  # another connection's view
        published.extend(tasks)

    context = context_for(settings, engines, enqueue)  # type: ignore[arg-type]
    assert deliver(context, first) == []
    assert seen == [[]]  # out before the record committed
    [second] = published
    assert job_row(settings, first.job_id).leases[str(second.seq)]["token"] == second.grant.token
    deliver(context, second)
    assert stage_seqs(settings, first.job_id) == [0, 1]


def test_a_message_that_outruns_its_commit_waits_for_it(
    in_process_settings, engines, calls, monkeypatch
):
    settings = in_process_settings
    [first] = submit(settings)
    received: list[list[StageTask]] = []
    receiver_done = threading.Event()
    outbox = Outbox()
    context = context_for(settings, engines, outbox)

    def enqueue(tasks) -> None:  # type: ignore[no-untyped-def]
        # A fast worker takes the message at once, while this transaction is still open.
        def receive() -> None:
            received.append(deliver(context, tasks[0]))
            receiver_done.set()

        threading.Thread(target=receive).start()
        time.sleep(0.5)  # the receiver reaches the job's row lock and waits there

    sender = context_for(settings, engines, enqueue)  # type: ignore[arg-type]
    deliver(sender, first)
    assert receiver_done.wait(60)
    assert stage_seqs(settings, first.job_id) == [0, 1]
    assert calls.count[(first.job_id, 1)] == 1


def test_duplicate_deliveries_start_a_stage_once(in_process_settings, context, calls):
    settings = in_process_settings
    [first] = submit(settings)
    results = in_threads(*(lambda: deliver(context, first) for _ in range(4)))
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert calls.count[(first.job_id, 0)] == 1
    assert stage_seqs(settings, first.job_id) == [0]
    assert sum(len(r) for r in results) == 0  # the one publish went to the outbox


# --- item 1: a locked read sees what its lock holder committed -----------------------------


def test_parallel_drafts_finishing_together_publish_the_next_step(
    in_process_settings, engines, calls, monkeypatch
):
    """The last two SCoT drafts record at once: one holds the job's lock (paused after its
    writes), the other waits for it. The waiter must see the holder's record and publish the
    selection step; with a record read in the same statement as the lock it saw neither."""
    settings = in_process_settings
    outbox = Outbox()
    context = context_for(settings, engines, outbox)
    drafts = submit(settings, "scot", SCOT)
    assert [task.seq for task in drafts] == [0, 1]
    holder_in = threading.Event()
    release = threading.Event()
    real = stage_rows.record_and_advance

    def paused(*args, **kwargs):  # type: ignore[no-untyped-def]
        inserted = real(*args, **kwargs)
        if threading.current_thread().name == "holder":
            holder_in.set()
            assert release.wait(30)
        return inserted

    monkeypatch.setattr(stage_rows, "record_and_advance", paused)
    holder = threading.Thread(target=lambda: deliver(context, drafts[0]), name="holder")
    holder.start()
    assert holder_in.wait(60)
    waiter = threading.Thread(target=lambda: deliver(context, drafts[1]), name="waiter")
    waiter.start()
    _wait_for_a_lock_wait(settings)  # the waiter's model call is done; it waits for the lock
    release.set()
    holder.join(60)
    waiter.join(60)
    assert stage_seqs(settings, drafts[0].job_id) == [0, 1]
    assert [(task.seq, task.queue) for task in outbox] == [(2, "coordinator")]
    assert "2" in job_row(settings, drafts[0].job_id).leases


# --- item 2: no ghost chains --------------------------------------------------------------


def test_a_discarded_recording_publishes_nothing_that_runs(
    in_process_settings, context, outbox, calls, monkeypatch
):
    settings = in_process_settings
    [first] = submit(settings)
    failures = iter([RuntimeError("disk full")])

    def fail_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        error = next(failures, None)
        if error is not None:
            raise error
        return real(*args, **kwargs)

    real = stage_rows.record_and_advance
    monkeypatch.setattr(stage_rows, "record_and_advance", fail_once)
    before = wasted("recording failed")
    with pytest.raises(jobs.RetryStage) as failed:
        deliver(context, first)
    assert wasted("recording failed") == before + 1
    [orphan] = outbox  # published before the transaction rolled back
    outbox.clear()
    assert deliver(context, orphan) == []  # its lease never committed: dropped, no model call
    assert calls.count[(first.job_id, orphan.seq)] == 0
    retry = failed.value.grant
    assert retry.retry_of is not None and retry.token == first.grant.token
    drive(context, outbox, [StageTask(first.job_id, first.seq, first.queue, retry)])
    assert job_row(settings, first.job_id).status == "succeeded"
    recorded = stage_seqs(settings, first.job_id)
    assert calls.of(first.job_id) == len(recorded) + 1  # the one recording that failed
    assert deliver(context, orphan) == [] and calls.count[(first.job_id, orphan.seq)] == 1


def test_messages_of_a_finished_job_run_nothing(in_process_settings, context, outbox, calls):
    settings = in_process_settings
    tasks = submit(settings)
    drive(context, outbox, tasks)
    job_id = tasks[0].job_id
    before = calls.of(job_id)
    for task in tasks:  # every message delivered again (a Redis restore, say)
        assert deliver(context, task) == []
    assert calls.of(job_id) == before


# --- item 3: a failed recording is retried, never dropped ---------------------------------


def _disconnect() -> Exception:
    from psycopg import OperationalError as DriverError
    from sqlalchemy.exc import OperationalError

    return OperationalError("INSERT", {}, DriverError("server closed the connection"))


def test_a_recording_survives_a_database_blip(
    in_process_settings, context, outbox, calls, monkeypatch
):
    settings = in_process_settings
    [first] = submit(settings)
    failures = iter([_disconnect(), _disconnect()])
    real = stage_rows.record_and_advance

    def blip(*args, **kwargs):  # type: ignore[no-untyped-def]
        error = next(failures, None)
        if error is not None:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(stage_rows, "record_and_advance", blip)
    deliver(context, first)
    assert stage_seqs(settings, first.job_id) == [0]
    assert calls.count[(first.job_id, 0)] == 1  # recorded on a retry, not run again
    [second] = [task for task in outbox if task.seq == 1][-1:]
    outbox.clear()
    drive(context, outbox, [second])
    assert job_row(settings, first.job_id).status == "succeeded"


def test_a_retry_starts_at_once_even_if_its_lease_could_not_be_released(
    in_process_settings, context, outbox, calls, monkeypatch
):
    settings = in_process_settings
    [first] = submit(settings)

    def down(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise _disconnect()

    with monkeypatch.context() as patch:  # Postgres away for longer than the retries
        patch.setattr(record_module, "RECORD_RETRY_S", 0.3)
        patch.setattr(stage_rows, "record_and_advance", down)
        patch.setattr(stage_module, "soft_transaction", down)
        with pytest.raises(jobs.RetryStage) as failed:
            deliver(context, first)
    retry = failed.value.grant
    assert job_row(settings, first.job_id).leases["0"]["holder"] == retry.retry_of  # still held
    # A duplicate of the original message waits out the live lease; the retry does not.
    assert deliver(context, first) == [] and calls.count[(first.job_id, 0)] == 1
    deliver(context, StageTask(first.job_id, 0, first.queue, retry))
    assert calls.count[(first.job_id, 0)] == 2
    assert stage_seqs(settings, first.job_id) == [0]
    assert job_row(settings, first.job_id).leases["1"]["attempts"] == 0  # the next stage


# --- items 4 and 5: lost and waiting messages ---------------------------------------------


def test_a_broker_blip_mid_hand_off_loses_nothing(in_process_settings, engines, calls):
    import redis

    settings = in_process_settings

    def down(tasks) -> None:  # type: ignore[no-untyped-def]
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    [first] = submit(settings)
    left = deliver(context_for(settings, engines, down), first)  # type: ignore[arg-type]
    [lost] = left  # not published before the commit; the publish after it fails too
    _stale(settings, first.job_id)
    resent: list[StageTask] = []
    reconcile(settings, resent.extend, deadline_s=0)
    [again] = [task for task in resent if task.job_id == first.job_id]
    assert (again.seq, again.grant.token) == (lost.seq, lost.grant.token)  # the same lease
    outbox = Outbox()
    context = context_for(settings, engines, outbox)
    results = in_threads(lambda: deliver(context, again), lambda: deliver(context, lost))
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert calls.count[(first.job_id, lost.seq)] == 1
    assert stage_seqs(settings, first.job_id) == [0, 1]


def test_a_waiting_message_is_resent_with_backoff_and_runs_once(
    in_process_settings, engines, calls
):
    settings = in_process_settings
    [first] = submit(settings)
    _stale(settings, first.job_id, lease_age_s=1.5)
    resent: list[StageTask] = []
    backlog = {"classifier": 5}

    def depth(queue: str) -> int:
        return backlog.get(queue, 0)

    reconcile(settings, resent.extend, deadline_s=1.0, queue_depth=depth)
    assert resent == []  # its queue holds messages: most likely waiting, not lost
    backlog.clear()
    _stale(settings, first.job_id, lease_age_s=1.5)
    reconcile(settings, resent.extend, deadline_s=1.0, queue_depth=depth)
    [copy] = resent
    assert copy.grant.token == first.grant.token
    assert job_row(settings, first.job_id).leases["0"]["resent"] == 1
    _stale(settings, first.job_id)
    reconcile(settings, resent.extend, deadline_s=1.0, queue_depth=depth)
    assert len(resent) == 1  # the next re-send waits twice as long
    outbox = Outbox()
    context = context_for(settings, engines, outbox)
    in_threads(lambda: deliver(context, copy), lambda: deliver(context, first))
    assert calls.count[(first.job_id, 0)] == 1 and stage_seqs(settings, first.job_id) == [0]


def test_a_holder_presumed_dead_is_fenced_off(in_process_settings, engines, calls, monkeypatch):
    """A worker cut off from Postgres misses its beats; its stage is granted again and run
    elsewhere; when the first worker comes back, its record is refused."""
    settings = in_process_settings
    [first] = submit(settings)
    outbox = Outbox()
    # Beats extend leases every 20 s: none lands between the expiry below and the reconciler.
    context = context_for(settings, engines, outbox, stage_deadline_s=60)
    in_model = threading.Event()
    resume = threading.Event()

    def hold(job_id: str, seq: int) -> None:
        if threading.current_thread().name == "cut-off":
            in_model.set()
            assert resume.wait(60)

    calls.hook = hold
    cut_off = threading.Thread(target=lambda: deliver(context, first), name="cut-off")
    cut_off.start()
    assert in_model.wait(60)
    _expire(settings, first.job_id)
    resent: list[StageTask] = []
    reconcile(settings, resent.extend, deadline_s=0)
    [regranted] = resent
    assert regranted.grant.token != first.grant.token
    before = wasted("lease lost")
    deliver(context, regranted)
    resume.set()
    cut_off.join(60)
    assert stage_seqs(settings, first.job_id) == [0]
    assert calls.count[(first.job_id, 0)] == 2
    assert wasted("lease lost") == before + 1


# --- item 6: cancellation from Postgres ---------------------------------------------------


def test_a_stage_delivered_after_a_cancel_never_runs(in_process_settings, context, outbox, calls):
    settings = in_process_settings
    [first] = submit(settings)
    with transaction(settings.database_url) as session:
        jobs.cancel(session, first.job_id)
    assert job_row(settings, first.job_id).status == "cancelled"
    assert deliver(context, first) == [] and calls.of(first.job_id) == 0


def test_a_cancel_between_stages_ends_the_job_at_once(in_process_settings, context, outbox, calls):
    settings = in_process_settings
    [first] = submit(settings)
    deliver(context, first)
    [second] = outbox
    with transaction(settings.database_url) as session:
        jobs.cancel(session, first.job_id)
    assert job_row(settings, first.job_id).status == "cancelled"
    assert deliver(context, second) == [] and calls.count[(first.job_id, 1)] == 0


def test_a_cancel_mid_stage_aborts_the_generation(in_process_settings, engines, calls):
    settings = in_process_settings
    context = context_for(settings, engines, Outbox(), stage_deadline_s=0.9)
    params = {"executor_max_tokens": 2000}
    request = {"question": "Write a very long story about a dragon, chapter by chapter."}
    with transaction(settings.database_url) as session:
        _job, [task], _ = jobs.submit(
            session,
            "delivery-tests",
            parse_job_request({**request, "strategy": "slm_only", "params": params}, 8000),
        )
    started = threading.Event()
    calls.hook = lambda job_id, seq: started.set()
    runner = threading.Thread(target=lambda: deliver(context, task))
    t0 = time.monotonic()
    runner.start()
    assert started.wait(60)
    time.sleep(0.5)
    with transaction(settings.database_url) as session:
        jobs.cancel(session, task.job_id)
    runner.join(60)
    elapsed = time.monotonic() - t0
    job = job_row(settings, task.job_id)
    assert job.status == "cancelled"
    with transaction(settings.database_url) as session:
        [stage] = session.scalars(select(Stage).where(Stage.job_id == task.job_id))
        assert stage.output["finish_reason"] == "abort"  # what ran is recorded and billed
        assert 0 < stage.generated_tokens < 2000
    assert elapsed < 10


# --- item 7: poison jobs ------------------------------------------------------------------


def _poison(settings, job_id: str) -> None:
    with transaction(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(strategy="retired-strategy"))


def test_a_poison_job_fails_and_the_reconciler_goes_on(in_process_settings, context, calls):
    settings = in_process_settings
    [poison] = submit(settings)
    [healthy] = submit(settings)
    _poison(settings, poison.job_id)
    for job_id in (poison.job_id, healthy.job_id):
        _stale(settings, job_id, lease_age_s=60)
    resent: list[StageTask] = []
    reconcile(settings, resent.extend, deadline_s=1.0)
    assert [task.job_id for task in resent] == [healthy.job_id]
    failed = job_row(settings, poison.job_id)
    assert failed.status == "failed" and "retired-strategy" in failed.error


def test_a_poison_job_delivered_to_a_worker_fails_without_a_model_call(
    in_process_settings, context, calls
):
    settings = in_process_settings
    [poison] = submit(settings)
    _poison(settings, poison.job_id)
    assert deliver(context, poison) == []
    job = job_row(settings, poison.job_id)
    assert job.status == "failed" and "invalid" in job.error and calls.of(poison.job_id) == 0


# --- item 8: one clock ---------------------------------------------------------------------


def test_leases_follow_the_database_clock_not_the_hosts(
    in_process_settings, engines, calls, monkeypatch
):
    settings = in_process_settings
    [first] = submit(settings)
    in_model = threading.Event()
    resume = threading.Event()

    def hold(job_id: str, seq: int) -> None:
        in_model.set()
        assert resume.wait(60)

    calls.hook = hold
    context = context_for(settings, engines, Outbox())
    runner = threading.Thread(target=lambda: deliver(context, first))
    runner.start()
    assert in_model.wait(60)
    real_time = time.time
    resent: list[StageTask] = []
    calls.hook = None
    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: real_time() + 86400)  # this host is a day ahead
        reconcile(settings, resent.extend, deadline_s=0)
        assert resent == []  # the holder's lease is live by the database's clock
        assert deliver(context, first) == []  # a duplicate still waits for the live holder
    resume.set()
    runner.join(60)
    assert calls.count[(first.job_id, 0)] == 1 and stage_seqs(settings, first.job_id) == [0]


# --- item 9: a wall-clock limit per stage ---------------------------------------------------


def test_a_stage_past_its_timeout_fails_its_attempt(in_process_settings, engines, calls):
    settings = in_process_settings
    context = context_for(
        settings, engines, Outbox(), stage_timeout_s=1.0, stage_deadline_s=0.9
    )
    request = {"question": "Write a very long story about a dragon, chapter by chapter."}
    with transaction(settings.database_url) as session:
        _job, [task], _ = jobs.submit(
            session,
            "delivery-tests",
            parse_job_request(
                {**request, "strategy": "slm_only", "params": {"executor_max_tokens": 2000}}, 8000
            ),
        )
    t0 = time.monotonic()
    with pytest.raises(jobs.RetryStage, match="TANDEM_STAGE_TIMEOUT_S"):
        deliver(context, task)
    assert time.monotonic() - t0 < 8  # aborted, not run to its 2000 tokens
    job = job_row(settings, task.job_id)
    assert job.status == "running" and "TANDEM_STAGE_TIMEOUT_S" in job.error
    lease = job.leases["0"]
    assert lease["holder"] is None and lease["attempts"] == 1  # released for the retry
    assert stage_seqs(settings, task.job_id) == []


def test_heartbeats_keep_a_slow_stage_alive(in_process_settings, engines, calls):
    settings = in_process_settings
    context = context_for(settings, engines, Outbox(), stage_deadline_s=0.9)
    [first] = submit(settings)
    in_model = threading.Event()
    resume = threading.Event()

    def slow(job_id: str, seq: int) -> None:
        in_model.set()
        assert resume.wait(60)

    calls.hook = slow
    runner = threading.Thread(target=lambda: deliver(context, first))
    runner.start()
    assert in_model.wait(60)
    time.sleep(2.0)  # over two deadlines
    resent: list[StageTask] = []
    reconcile(settings, resent.extend, deadline_s=0.9)
    assert resent == []  # beating: not taken for dead
    resume.set()
    runner.join(60)
    assert stage_seqs(settings, first.job_id) == [0] and calls.count[(first.job_id, 0)] == 1


# --- helpers --------------------------------------------------------------------------------


def _wait_for_a_lock_wait(settings, timeout_s: float = 60) -> None:
    """Until some session of this database waits for a row lock."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with transaction(settings.database_url) as session:
            if session.scalar(query):
                return
        time.sleep(0.05)
    raise AssertionError("nobody waited for the job's row lock")


def _stale(settings, job_id: str, lease_age_s: float = 0.0) -> None:
    """Make a job look forgotten: no progress for an hour, its leases granted long ago."""
    with transaction(settings.database_url) as session:
        session.execute(
            text(
                "UPDATE jobs SET updated_at = now() - interval '1 hour', leases = ("
                " SELECT coalesce(jsonb_object_agg(key, value || jsonb_build_object("
                "   'granted_at', extract(epoch FROM now()) - :age)), '{}'::jsonb)"
                " FROM jsonb_each(leases)) WHERE id = :id"
            ),
            {"id": job_id, "age": lease_age_s},
        )


def _expire(settings, job_id: str) -> None:
    """Every held lease of the job ran out (its holder stopped beating)."""
    with transaction(settings.database_url) as session:
        session.execute(
            text(
                "UPDATE jobs SET updated_at = now() - interval '1 hour', leases = ("
                " SELECT jsonb_object_agg(key, value || '{\"until\": 1}'::jsonb)"
                " FROM jsonb_each(leases)) WHERE id = :id"
            ),
            {"id": job_id},
        )
