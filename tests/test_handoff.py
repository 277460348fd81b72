"""Stage hand-off: the worker that records a stage claims the next one for whoever gets its
message, which then skips the claim transaction. Real Postgres, Redis and default model,
driving `run_stage` in this process the way the Celery task does."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from services import jobs
from services.broker import Broker
from services.core.engines import Engines
from services.core.requests import parse_job_request
from services.core.steps import Generate, Judge, step_from_json, step_to_json
from services.storage.db import transaction
from services.storage.models import Job, Stage

PARAMS = {"budgets": [0, 12, 24], "executor_max_tokens": 16, "cost_preference": "quality"}


def test_steps_survive_their_json_form() -> None:
    generate = Generate(
        role="coordinator",
        kind="coordinator",
        max_tokens=12,
        messages=({"role": "user", "content": "2+2?"},),
        continuation="Goal: add",
        stop=("\n\n",),
        seed=7,
        top_logprobs=5,
        note="budget 12",
    )
    judge = Judge(question="2+2?", hint="Goal: add", stage_index=1, budget=12)
    for step in (generate, judge):
        assert step_from_json(step_to_json(step)) == step
    with pytest.raises(ValueError, match="not a step"):
        step_from_json({"type": "Shell", "command": "rm"})


@pytest.fixture(scope="module")
def engines(in_process_settings) -> Iterator[Engines]:
    from services.settings import Settings

    engines = Engines(Settings(local_threads=1))
    yield engines
    engines.close()


@pytest.fixture
def broker(in_process_settings) -> Broker:
    return Broker(in_process_settings.redis_url)


def submit(settings, deadline_s: float | None = None) -> list[jobs.Task]:
    request = parse_job_request({"question": "What is 17 + 25?", "params": PARAMS}, 8000)
    with transaction(settings.database_url) as session:
        _job, tasks, _ = jobs.submit(session, "handoff-tests", request, deadline_s=deadline_s)
    return tasks


def second_stage(settings, engines: Engines, broker: Broker) -> jobs.Task:
    """Submit a job and run its first stage; returns the handed-off task that follows."""
    [first] = submit(settings)
    [second] = jobs.run_stage(settings, engines, first.job_id, first.seq, None, broker)
    return second


def stage_seqs(settings, job_id: str) -> list[int]:
    with transaction(settings.database_url) as session:
        return list(session.scalars(select(Stage.seq).where(Stage.job_id == job_id)))


def job_row(settings, job_id: str) -> Job:
    with transaction(settings.database_url) as session:
        return session.get_one(Job, job_id)


def test_a_recorded_stage_hands_the_next_one_off(in_process_settings, engines, broker) -> None:
    settings = in_process_settings
    [first] = submit(settings)
    assert first.handoff is None  # the first stage is claimed the usual way
    [second] = jobs.run_stage(settings, engines, first.job_id, first.seq, None, broker)
    assert second.handoff is not None
    lease = job_row(settings, second.job_id).leases[str(second.seq)]
    assert lease["token"] == second.handoff["token"]
    assert lease["attempts"] == 1  # counted by the hand-off, not again by the receiver

    following = jobs.run_stage(settings, engines, second.job_id, second.seq, second.handoff, broker)
    assert stage_seqs(settings, second.job_id) == [0, 1]
    assert job_row(settings, second.job_id).leases.get(str(second.seq)) is None
    # The same message again (a redelivery): its token is used, the full claim finds the
    # stage recorded, nothing runs or is written twice.
    assert (
        jobs.run_stage(settings, engines, second.job_id, second.seq, second.handoff, broker) == []
    )
    assert stage_seqs(settings, second.job_id) == [0, 1]
    # The job still finishes through hand-offs.
    while following:
        [task] = following
        following = jobs.run_stage(settings, engines, task.job_id, task.seq, task.handoff, broker)
    assert job_row(settings, second.job_id).status == "succeeded"


def test_a_duplicate_delivery_waits_out_the_live_lease(
    in_process_settings, engines, broker
) -> None:
    settings = in_process_settings
    second = second_stage(settings, engines, broker)
    # Another delivery of this message took the hand-off and is (as far as anyone can
    # tell) still running: this one must not run the stage.
    assert broker.take_handoff(second.handoff["token"], second.job_id, None)
    assert (
        jobs.run_stage(settings, engines, second.job_id, second.seq, second.handoff, broker) == []
    )
    assert stage_seqs(settings, second.job_id) == [0]
    assert job_row(settings, second.job_id).leases[str(second.seq)]["attempts"] == 1


def test_a_cancel_reaches_a_handed_off_stage_before_it_runs(
    in_process_settings, engines, broker
) -> None:
    settings = in_process_settings
    second = second_stage(settings, engines, broker)
    with transaction(settings.database_url) as session:
        jobs.request_cancel(session, session.get_one(Job, second.job_id))
    broker.flag_cancelled(job_id=second.job_id)
    assert (
        jobs.run_stage(settings, engines, second.job_id, second.seq, second.handoff, broker) == []
    )
    assert stage_seqs(settings, second.job_id) == [0]
    assert job_row(settings, second.job_id).status == "cancelled"


def test_the_next_stage_is_published_before_the_commit(
    in_process_settings, engines, broker
) -> None:
    settings = in_process_settings
    [first] = submit(settings)
    published: list[jobs.Task] = []

    def enqueue(tasks) -> None:  # type: ignore[no-untyped-def]
        # Another connection does not see the stage yet: this runs inside the transaction.
        assert stage_seqs(settings, first.job_id) == []
        published.extend(tasks)

    assert jobs.run_stage(settings, engines, first.job_id, 0, None, broker, enqueue) == []
    [second] = published
    assert stage_seqs(settings, first.job_id) == [0]
    assert (
        job_row(settings, first.job_id).leases[str(second.seq)]["token"]
        == (second.handoff["token"])
    )
    jobs.run_stage(settings, engines, second.job_id, second.seq, second.handoff, broker)
    assert stage_seqs(settings, first.job_id) == [0, 1]


def test_an_early_message_from_a_failed_transaction_records_nothing(
    in_process_settings, engines, broker, monkeypatch
) -> None:
    settings = in_process_settings
    [first] = submit(settings)
    published: list[jobs.Task] = []

    def fail(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("the database went away mid-transaction")

    with monkeypatch.context() as patch:
        patch.setattr(jobs.repository, "add_stage", fail)
        with pytest.raises(RuntimeError, match="went away"):
            jobs.run_stage(settings, engines, first.job_id, 0, None, broker, published.extend)
    [orphan] = published  # out before the transaction failed
    assert stage_seqs(settings, first.job_id) == []
    # Its receiver runs the step, but the job as committed does not ask for it: dropped.
    assert (
        jobs.run_stage(settings, engines, orphan.job_id, orphan.seq, orphan.handoff, broker) == []
    )
    assert stage_seqs(settings, first.job_id) == []
    # The first stage's redelivery (its lease released) records it and hands off anew.
    jobs._release(settings.database_url, first.job_id, 0)
    [second] = jobs.run_stage(settings, engines, first.job_id, 0, None, broker)
    assert second.handoff["token"] != orphan.handoff["token"]
    jobs.run_stage(settings, engines, second.job_id, second.seq, second.handoff, broker)
    assert stage_seqs(settings, first.job_id) == [0, 1]


def test_a_handed_off_stage_publishes_what_follows_from_its_history(
    in_process_settings, engines, broker
) -> None:
    settings = in_process_settings
    second = second_stage(settings, engines, broker)
    assert [record["seq"] for record in second.handoff["records"]] == [0]
    calls: list[list[jobs.Task]] = []
    assert (
        jobs.run_stage(
            settings, engines, second.job_id, second.seq, second.handoff, broker, calls.append
        )
        == []
    )
    # One publish, before the transaction: Postgres agreed, so nothing went out twice.
    [[third]] = calls
    assert (
        job_row(settings, second.job_id).leases[str(third.seq)]["token"] == (third.handoff["token"])
    )
    assert [record["seq"] for record in third.handoff["records"]] == [0, 1]


def test_a_stale_history_is_corrected_by_the_transaction(
    in_process_settings, engines, broker
) -> None:
    settings = in_process_settings
    second = second_stage(settings, engines, broker)
    stale = {**second.handoff, "question": "What is 17 + 26?"}  # not what Postgres holds
    calls: list[list[jobs.Task]] = []
    jobs.run_stage(settings, engines, second.job_id, second.seq, stale, broker, calls.append)
    [[guess], [right]] = calls  # the early guess, then the transaction's own
    assert guess.seq == right.seq and guess.handoff["step"] != right.handoff["step"]
    assert (
        job_row(settings, second.job_id).leases[str(right.seq)]["token"] == (right.handoff["token"])
    )
    # The guess runs (its token is fresh) but is not what the job asks for: not recorded.
    assert jobs.run_stage(settings, engines, guess.job_id, guess.seq, guess.handoff, broker) == []
    assert stage_seqs(settings, second.job_id) == [0, 1]
    jobs.run_stage(settings, engines, right.job_id, right.seq, right.handoff, broker)
    assert stage_seqs(settings, second.job_id) == [0, 1, 2]


def test_submit_hands_off_the_first_stage(in_process_settings, engines, broker) -> None:
    settings = in_process_settings
    [first] = submit(settings, deadline_s=120)
    assert first.handoff is not None and first.handoff["starts_job"]
    job = job_row(settings, first.job_id)
    assert job.status == "queued" and job.leases["0"]["token"] == first.handoff["token"]
    # Its receiver marks the job running as the model starts (no claim transaction did).
    with jobs.heartbeat(settings.database_url, first.job_id, 0, 120, starts_job=True):
        deadline = time.monotonic() + 10
        while job_row(settings, first.job_id).status == "queued" and time.monotonic() < deadline:
            time.sleep(0.02)
        running = job_row(settings, first.job_id)
    assert running.status == "running" and running.started_at is not None
    assert running.attempts == 1

    [second] = jobs.run_stage(settings, engines, first.job_id, 0, first.handoff, broker)
    assert stage_seqs(settings, first.job_id) == [0]
    assert not second.handoff["starts_job"]
    job = job_row(settings, first.job_id)
    assert job.status == "running" and job.started_at == running.started_at
    assert job.leases.get("0") is None


def test_a_job_cancelled_while_queued_drops_its_handed_off_first_stage(
    in_process_settings, engines, broker
) -> None:
    settings = in_process_settings
    [first] = submit(settings, deadline_s=120)
    with transaction(settings.database_url) as session:
        jobs.request_cancel(session, session.get_one(Job, first.job_id))
    # No cancel flag reached Redis: the stage runs, but its record is not kept.
    assert jobs.run_stage(settings, engines, first.job_id, 0, first.handoff, broker) == []
    assert stage_seqs(settings, first.job_id) == []
    assert job_row(settings, first.job_id).status == "cancelled"
