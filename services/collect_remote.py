"""Collecting the classifier's training data through a running deployment
(`tandem classifier collect --services URL`): one `fixed:B` job per budget over REST.

Each fixed:B job regenerates the coordinator stream from scratch up to B tokens, so
collecting this way costs about len(budgets)/2 times the embedded path's coordinator
tokens (the recorded costs are the same: a Tandem run stopping at B pays B tokens).
Features are computed by this process's feature model over the jobs' insights (a fixed
job consults no classifier), in `services.core.classifier.collect.line_from_fixed_jobs`.
Jobs carry an Idempotency-Key, so a resumed collection picks up the jobs it already
submitted instead of paying for them again.
"""

from __future__ import annotations

from typing import Any

import httpx

from services.client import APIError, TandemClient
from services.core.classifier.collect import CollectError, Grade, Item, line_from_fixed_jobs
from services.core.engines import Engines
from services.core.params import JobParams


class ServicesCollector:
    """`collect_question` for `classifier.collect.collect`, through the API at `url`."""

    def __init__(
        self,
        url: str,
        key: str,
        engines: Engines,
        poll_s: float = 1.0,
        timeout_s: float = 3600.0,
        transport: httpx.BaseTransport | None = None,
        grade: Grade | None = None,
    ) -> None:
        self.engines = engines
        self.grade = grade  # labels code items (sandboxed, in this process)
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.api = TandemClient(url, key, timeout=60.0, transport=transport)

    def close(self) -> None:
        self.api.close()

    def collect_question(self, item: Item, params: JobParams) -> dict[str, Any]:
        return line_from_fixed_jobs(
            self.engines, item, params, lambda budget: self._run(item, params, budget), self.grade
        )

    def _run(self, item: Item, params: JobParams, budget: int) -> dict[str, Any]:
        """The finished fixed:B job of this question, with its stages."""
        key = (
            f"tandem-collect:{item.qid}:{budget}:{params.executor_max_tokens}:{params.temperature}"
        )
        job_params = {
            "executor_max_tokens": params.executor_max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
            **item.job_params,  # a code item: task and entry point
        }
        try:
            job = self.api.submit_job(item.question, f"fixed:{budget}", job_params, key[:200])
            job = self.api.wait_job(
                job["id"], self.timeout_s, first_pause_s=self.poll_s, max_pause_s=self.poll_s
            )
        except (APIError, TimeoutError) as error:
            raise CollectError(f"{item.qid}, fixed:{budget}: {error}") from None
        if job["status"] != "succeeded":
            raise CollectError(
                f"job {job['id']} ({item.qid}, fixed:{budget}) {job['status']}: {job.get('error')}"
            )
        return job
