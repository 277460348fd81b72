"""One client of tandem's REST API, for our own tools: `tandem batch` (services.batch_cli),
`tandem eval --services` (services.evaluation.harness.ServiceRunner) and `tandem classifier
collect --services` (services.collect_remote).

One retry policy (`RetryPolicy`), applied to every call that is safe to repeat: GETs,
cancels (cancelling twice is cancelling once), and POSTs carrying an Idempotency-Key (the
API answers a repeat with what the first request made):

* a transport error (connection refused or reset, a timeout, a reply lost on the way):
  again after a pause that doubles, `transport_attempts` tries in all
  (`services.retry.retry_transport`);
* 429 or 503 (over a rate or quota, queues full, broker or database down: the API accepted
  nothing): again after the response's Retry-After (else `default_retry_after_s`), at
  most `busy_attempts` times;
* 409 with Retry-After on a keyed POST (the first request with that key is still being
  processed, e.g. a batch upload still being read): waited for like a 429.

Any other call is sent once. Every failure is an `APIError` carrying the HTTP status (None
when the API could not be reached) and the problem's `detail`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from services.retry import retry_transport

JOB_FINAL = ("succeeded", "failed", "cancelled")
DEFAULT_TIMEOUT = httpx.Timeout(30.0, read=600.0, write=600.0)  # uploads and results are big


@dataclass(frozen=True)
class RetryPolicy:
    transport_attempts: int = 5  # tries in all when the API cannot be reached
    first_pause_s: float = 0.5  # after the first transport error; doubles after each
    busy_attempts: int = 100  # waits on 429 / 503 (and 409 with Retry-After, keyed)
    default_retry_after_s: float = 2.0  # a busy answer without Retry-After


SEND_ONCE = RetryPolicy(transport_attempts=1, busy_attempts=0)


class APIError(Exception):
    """A call failed: `status` is the HTTP status (None: the API was not reached), `detail`
    the problem's detail, `problem` the whole problem document (e.g. a batch's `errors`)."""

    def __init__(self, detail: str, status: int | None = None, problem: Any = None) -> None:
        super().__init__(f"{status}: {detail}" if status is not None else detail)
        self.detail = detail
        self.status = status
        self.problem: dict[str, Any] = problem if isinstance(problem, dict) else {}


@dataclass(frozen=True)
class ResultsStream:
    """A batch's results being downloaded: the batch's status when the download began,
    and the JSONL body in chunks."""

    batch_status: str | None
    chunks: Iterator[bytes]


class TandemClient:
    """The REST API as methods returning its JSON. Thread-safe (one pooled httpx.Client)."""

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        retry: RetryPolicy = RetryPolicy(),
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
            transport=transport,
        )
        self._owns_http = True
        self.retry = retry

    @classmethod
    def over(cls, http: httpx.Client, retry: RetryPolicy = RetryPolicy()) -> TandemClient:
        """A client sending through an existing httpx.Client (its base URL, headers and
        transport, e.g. an in-process WSGI app), which `close` leaves open."""
        client = cls.__new__(cls)
        client._http, client._owns_http, client.retry = http, False, retry
        return client

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- jobs -------------------------------------------------------------------------

    def submit_job(
        self,
        question: str,
        strategy: str = "tandem",
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """POST /v1/jobs. With a key, the same key returns the same job (so it is retried)."""
        body = {"question": question, "strategy": strategy, "params": params or {}}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/jobs", json=body, headers=headers)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def wait_job(
        self,
        job_id: str,
        timeout_s: float = 3600.0,
        first_pause_s: float = 0.25,
        max_pause_s: float = 2.0,
    ) -> dict[str, Any]:
        """Poll until the job is final (pauses grow 1.5x up to `max_pause_s`); its JSON
        with stages. TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        pause = min(first_pause_s, max_pause_s)
        while True:
            job = self.get_job(job_id)
            if job["status"] in JOB_FINAL:
                return job
            if time.monotonic() + pause > deadline:
                raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f}s")
            time.sleep(pause)
            pause = min(max_pause_s, pause * 1.5)

    # --- batches ----------------------------------------------------------------------

    def upload_batch(
        self,
        file: Path,
        strategy: str | None = None,
        params: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """POST /v1/batches with the file as its body (sent from its start on each try),
        under an Idempotency-Key (a new one unless given), so a retry after a lost reply
        gets the batch the first try made rather than a second batch."""
        query = {name: value for name, value in (("strategy", strategy), ("params", params)) if value}
        headers = {
            "Content-Type": "application/jsonl",
            "Idempotency-Key": idempotency_key or uuid.uuid4().hex,
        }

        return self._json(
            "POST", "/v1/batches", params=query, headers=headers, body=lambda: file.open("rb")
        )

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/batches/{batch_id}")

    def list_batches(self, limit: int = 20) -> dict[str, Any]:
        return self._json("GET", "/v1/batches", params={"limit": limit})

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/batches/{batch_id}/cancel", idempotent=True)

    @contextmanager
    def batch_results(self, batch_id: str) -> Iterator[ResultsStream]:
        """GET /v1/batches/{id}/results, streamed. Retried until the body starts; a break
        in the middle of the body is an APIError (download again)."""
        response = self._send("GET", f"/v1/batches/{batch_id}/results", stream=True)
        try:
            yield ResultsStream(response.headers.get("X-Batch-Status"), self._chunks(response))
        finally:
            response.close()

    # --- the one retry policy -----------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise APIError(
                f"{method} {path}: the API answered {response.status_code} with no JSON",
                response.status_code,
            ) from None

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        body: Callable[[], BinaryIO] | None = None,
        idempotent: bool | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """Send under the retry policy (see the module docstring); the response, or an
        APIError for a failure status or an unreachable API."""
        keyed = bool(headers and "Idempotency-Key" in headers)
        if idempotent is None:
            idempotent = method == "GET" or keyed
        policy = self.retry if idempotent else SEND_ONCE

        def attempt() -> httpx.Response:
            content = body() if body else None  # each try sends the body from its start
            try:
                request = self._http.build_request(
                    method, path, json=json, params=params, headers=headers, content=content
                )
                return self._http.send(request, stream=stream)
            finally:
                if content is not None:
                    content.close()

        busy = 0
        while True:
            try:
                response = retry_transport(
                    attempt, policy.transport_attempts, policy.first_pause_s
                )
            except httpx.TransportError as error:
                raise APIError(f"cannot reach the API at {self.base_url}: {error}") from None
            except httpx.HTTPError as error:
                raise APIError(f"{method} {path}: {error}") from None
            if response.status_code < 400:
                return response
            wait = _busy_wait(response, keyed, policy)
            if wait is not None and busy < policy.busy_attempts:
                busy += 1
                response.close()
                time.sleep(wait)
                continue
            if stream:
                response.read()
            raise _error(response, busy)

    def _chunks(self, response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes()
        except httpx.HTTPError as error:
            raise APIError(f"the download from {self.base_url} broke off: {error}") from None


def _busy_wait(response: httpx.Response, keyed: bool, policy: RetryPolicy) -> float | None:
    """Seconds to wait before trying again, or None when the answer is final."""
    retry_after = response.headers.get("Retry-After")
    status = response.status_code
    if status not in (429, 503) and not (status == 409 and keyed and retry_after):
        return None
    try:
        return max(0.0, float(retry_after)) if retry_after else policy.default_retry_after_s
    except ValueError:  # an HTTP date: not sent by our API
        return policy.default_retry_after_s


def _error(response: httpx.Response, busy: int) -> APIError:
    try:
        problem = response.json()
        detail = (problem.get("detail") or problem) if isinstance(problem, dict) else problem
    except ValueError:
        problem, detail = None, response.text[:300]
    detail = str(detail)
    if busy:
        detail += f" (still {response.status_code} after {busy} waits)"
    return APIError(detail, response.status_code, problem)
