"""Celery workers: `celery -A workers worker -Q coordinator|classifier|executor --pool threads`.

Thin by design: each task wires a queue message (job id, seq) to `services.jobs.run_stage`."""

from workers.app import app

__all__ = ["app"]
