"""A job's life in service mode, and the delivery rules that give exactly-once effect.

    submit.py     insert a queued job with the leases of its first steps
    start.py      a delivered message takes its stage's lease (or is dropped)
    heartbeat.py  one thread per worker process keeps running stages' leases alive, and
                  stops a stage whose job was cancelled, whose lease was taken over, or
                  which ran past the stage timeout
    record.py     a finished stage's record, the job's next state and the next messages,
                  in one transaction
    stage.py      the worker's whole job: start, run, record, and what a failed attempt does
    dispatch.py   the one way a job's next steps get leases and messages
    leases.py     who may run a stage, and until when
    view.py       a job as a stage transaction sees it, locked, on the database's clock
    cancel.py     cancel a job
    reconcile.py  the safety net: re-send what was lost, re-grant what a dead worker held

Postgres is the source of truth; Redis only carries messages. The rules:
- A stage runs only under its lease, and a lease is only ever changed under the job's row
  lock. A message carries its lease's token; of all deliveries of a stage (redeliveries,
  the reconciler's re-sends, retries) exactly one starts it. A message sent before its
  lease committed waits for that commit, and dies with its transaction if that rolls back.
- A stage's record, the job's new state and the next stages' leases commit together, and
  only while the recording delivery still holds the lease. Records are unique by
  (job, seq); a stage already recorded is never run or written again.
- A holder that stops beating (a dead worker, one cut off from Postgres) loses its lease
  after a stage deadline; the reconciler grants the stage to a new message, and the old
  holder can no longer record (fencing).
- Every time (lease ends, deadlines, staleness) is the database's clock.
- A stage is cancelled at its boundary; a job that is not running a stage ends at once.
- A stage that fails `max_stage_attempts` times, or a job whose request no longer replays,
  fails with the reason instead of looping.
"""

from services.jobs.cancel import cancel
from services.jobs.messages import Grant, StageTask
from services.jobs.reconcile import reconcile
from services.jobs.stage import RetryStage, StageContext, run_stage
from services.jobs.submit import submit

__all__ = [
    "Grant",
    "RetryStage",
    "StageContext",
    "StageTask",
    "cancel",
    "reconcile",
    "run_stage",
    "submit",
]
