"""POST /v1/chat/completions: the messages become a job (a real one: in Postgres, on the
interactive lane, visible at /v1/jobs/{id}, cancellable), and the request waits for it.

- Plain: the `chat.completion` once the job ends; `usage` sums every stage of every model,
  `tandem` says which job it was, its stages and its TFLOPs.
- `stream: true`: Server-Sent Events of `chat.completion.chunk`, ending `data: [DONE]`. The
  role chunk goes at once; then one chunk per stage as each is recorded (Tandem's insights
  as `reasoning_content`, every stage's cost in `tandem.stage`); the answer when the job
  ends, in pieces; `usage` last when `stream_options.include_usage`. The answer itself is
  not streamed token by token: the final stage runs on a worker and reaches Postgres whole.
  A comment line every second keeps proxies from closing the stream and finds out when the
  client has gone.
- A client that goes away (the stream's write fails, or the socket is closed under a
  waiting request) cancels its job.
- Past TANDEM_OPENAI_WAIT_S: 504 (in a stream, an error event) with the job id; the job goes
  on, and `x-should-retry: false` keeps the SDKs from submitting it again.

How requests map to jobs: services/api/openai/mapping.py and docs/openai.md.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from services import jobs as job_service
from services.api.auth import authenticate
from services.api.jobs import idempotency_key
from services.api.limits import check_active_quota
from services.api.openai import catalog, mapping
from services.api.openai.protocol import (
    ChatCompletionChunk,
    ChunkChoice,
    ChunkTandem,
    Delta,
    OpenAIError,
)
from services.api.openai.waiting import JobEvents
from services.core.requests import JobRequest
from services.core.steps import StageRecord
from services.settings import Settings
from services.storage import job_rows, stage_rows
from services.storage.db import in_transaction, transaction
from services.storage.statuses import FINAL_JOB_STATUSES, JobStatus

bp = Blueprint("chat", __name__)
log = logging.getLogger("tandem.api.openai")

HEARTBEAT_S = 1.0  # a comment line this often while a stream waits
PIECE_CHARS = 48  # the answer is sent in pieces of about this many characters
NO_RETRY = {"x-should-retry": "false"}  # the SDKs would otherwise submit the job again


def settings() -> Settings:
    return current_app.config["TANDEM"]


def job_events() -> JobEvents:
    events = current_app.extensions.get("tandem.job_events")
    if events is None:
        config = settings()
        events = current_app.extensions.setdefault(
            "tandem.job_events", JobEvents(config.database_url, config.db_pooler)
        )
    return events


def read_json() -> Any:
    if not request.is_json:
        raise OpenAIError(415, "send a JSON body with 'Content-Type: application/json'")
    try:
        return json.loads(request.get_data(cache=False) or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OpenAIError(400, f"We could not parse the JSON body of your request: {error}") from None
    except RecursionError:
        raise OpenAIError(400, "We could not parse the JSON body: nested too deeply") from None


@bp.post("/chat/completions")
def create_chat_completion() -> Response:
    owner = authenticate()
    config = settings()
    chat = mapping.parse_chat(read_json(), config.max_question_chars)
    key = idempotency_key()
    current_app.extensions["tandem.admission"].check(owner)
    with transaction(config.database_url) as session:
        check_active_quota(session, owner, config.max_active_jobs)
        job, tasks, _created = job_service.submit(session, owner, chat.request, key)
        job_id, created = job.id, int(job.created_at.timestamp())
    try:
        current_app.extensions["tandem.enqueue"](tasks)
    except Exception as error:  # the broker went away after admission; the job is committed
        log.warning("job %s accepted, enqueue failed (the reconciler will): %s", job_id, error)
    wait = Wait(
        url=config.database_url,
        owner=owner,
        job_id=job_id,
        events=job_events(),
        deadline=time.monotonic() + config.openai_wait_s,
        wait_s=config.openai_wait_s,
        client_gone=client_gone(request.environ),
    )
    headers = {"X-Tandem-Job-Id": job_id, "Location": f"/v1/jobs/{job_id}"}
    if chat.stream:
        stream = Stream(wait, chat.request, created, chat.include_usage)
        return Response(
            stream.events(),
            mimetype="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    job = wait.until_final()
    if job is None:  # the client went away; its job is cancelled and nobody reads this
        return Response(status=499)
    body = wait.outcome(job)
    answer = jsonify(body)
    answer.headers.update(headers)
    return answer


# --- waiting ------------------------------------------------------------------------------


@dataclass
class JobState:
    status: str
    error: str | None
    answer: str | None
    final_text: str | None
    strategy: str
    params: dict[str, Any]
    created_at: Any
    records: list[StageRecord]

    @property
    def final(self) -> bool:
        return self.status in FINAL_JOB_STATUSES


@dataclass
class Wait:
    """One request waiting for its job."""

    url: str
    owner: str
    job_id: str
    events: JobEvents
    deadline: float
    wait_s: float
    client_gone: Callable[[], bool]

    def read(self) -> JobState:
        with transaction(self.url) as session:
            job = job_rows.owned(session, self.job_id, self.owner, with_stages=True)
            if job is None:  # deleted under us (retention): nothing to wait for
                raise OpenAIError(404, f"the job {self.job_id} is gone")
            return JobState(
                status=job.status,
                error=job.error,
                answer=job.answer,
                final_text=job.final_text,
                strategy=job.strategy,
                params=job.params,
                created_at=job.created_at,
                records=[stage_rows.to_record(stage) for stage in job.stages],
            )

    def states(self) -> Iterator[JobState | None]:
        """The job when it may have changed (a wake-up, or the poll of `JobEvents.pause`)
        until it is final; None every `HEARTBEAT_S` in between, for the caller to check on
        its client. Ends at the deadline."""
        attempt = 0
        with self.events.watch(self.job_id) as wake:
            state = self.read()
            next_read = time.monotonic() + self.events.pause(attempt)
            yield state
            while not state.final:
                now = time.monotonic()
                if now >= self.deadline:
                    return
                woke = wake.wait(max(0.0, min(self.deadline, next_read, now + HEARTBEAT_S) - now))
                wake.clear()
                if woke or time.monotonic() >= next_read:
                    attempt += 1
                    state = self.read()
                    next_read = time.monotonic() + self.events.pause(attempt)
                    yield state
                else:
                    yield None

    def until_final(self) -> JobState | None:
        """The final job, or None once the client has gone (the job is then cancelled);
        raises the 504 past the deadline."""
        last: JobState | None = None
        for state in self.states():
            last = state or last
            if (state is None or not state.final) and self.client_gone():
                self.cancel("the client closed the connection")
                return None
        if last is None or not last.final:
            raise self.timeout()
        return last

    def cancel(self, why: str) -> None:
        log.info("cancelling job %s: %s", self.job_id, why)
        try:
            in_transaction(self.url, lambda session: job_service.cancel(session, self.job_id))
        except Exception as error:  # the reconciler ends it at its deadline anyway
            log.warning("could not cancel job %s: %s", self.job_id, error)

    def timeout(self) -> OpenAIError:
        return OpenAIError(
            504,
            f"the job {self.job_id} did not finish within {self.wait_s:g} s "
            f"(TANDEM_OPENAI_WAIT_S); it goes on: poll /v1/jobs/{self.job_id}",
            code="job_timeout",
            param=None,
            headers={**NO_RETRY, "X-Tandem-Job-Id": self.job_id},
        )

    def outcome(self, state: JobState) -> dict[str, Any]:
        """The completion of a succeeded job; raises the error of a failed or cancelled one."""
        if state.status == JobStatus.SUCCEEDED:
            finished = mapping.from_records(
                self.job_id,
                state.strategy,
                job_rows.request_of("?", state.strategy, state.params).params,
                state.created_at,
                state.answer,
                state.final_text,
                state.records,
            )
            return dump_completion(mapping.completion(finished, f"/v1/jobs/{self.job_id}"))
        if state.status == JobStatus.CANCELLED:
            raise OpenAIError(
                409,
                f"the job {self.job_id} was cancelled before it finished",
                code="job_cancelled",
                headers={**NO_RETRY, "X-Tandem-Job-Id": self.job_id},
            )
        raise OpenAIError(
            500,
            f"the job {self.job_id} failed: {state.error}",
            type="server_error",
            code="job_failed",
            headers={**NO_RETRY, "X-Tandem-Job-Id": self.job_id},
        )


def dump_completion(completion: Any) -> dict[str, Any]:
    body = completion.model_dump(mode="json")
    message = body["choices"][0]["message"]
    if message.get("reasoning_content") is None:
        message.pop("reasoning_content", None)
    return body


def client_gone(environ: dict[str, Any]) -> Callable[[], bool]:
    """Whether the client closed its connection, for a request that has written nothing
    yet. Gunicorn hands the socket over in the environ: a peek that reads end-of-stream
    means the peer closed it. Without the socket (another server), we cannot tell."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return lambda: False

    def gone() -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    return gone


# --- streaming ----------------------------------------------------------------------------


class Stream:
    """The Server-Sent Events of one streamed completion (runs after the view returned:
    nothing here may touch the request or the app)."""

    def __init__(self, wait: Wait, job: JobRequest, created: int, include_usage: bool) -> None:
        self.wait = wait
        self.id = mapping.completion_id(wait.job_id)
        self.created = created
        self.model = catalog.model_of(job.strategy, job.params)
        self.strategy = job.strategy
        self.include_usage = include_usage

    def events(self) -> Iterator[bytes]:
        finished = False
        try:
            yield self._chunk(Delta(role="assistant", content=""), tandem=ChunkTandem(job_id=self.wait.job_id))
            sent, beat = 0, time.monotonic()
            state: JobState | None = None
            for found in self.wait.states():
                if found is not None:
                    state = found
                    for record in state.records[sent:]:
                        yield self._stage(record)
                        beat = time.monotonic()
                    sent = len(state.records)
                    if state.final:
                        break
                if self.wait.client_gone():
                    return  # `finally` cancels the job
                if time.monotonic() - beat >= HEARTBEAT_S:
                    yield b": waiting for the job\n\n"  # a failed write here ends the stream
                    beat = time.monotonic()
            if state is None or not state.final:
                yield self._error(self.wait.timeout())
            else:
                try:
                    body = self.wait.outcome(state)
                except OpenAIError as error:
                    yield self._error(error)
                else:
                    yield from self._answer(body)
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:  # the client went away (GeneratorExit) or the stream broke
                self.wait.cancel("the streaming client went away")

    def _stage(self, record: StageRecord) -> bytes:
        delta = Delta()
        if mapping.is_insight(self.strategy, record) and record.text:
            delta = Delta(reasoning_content=record.text)
        return self._chunk(
            delta, tandem=ChunkTandem(job_id=self.wait.job_id, stage=mapping.stage_summary(record))
        )

    def _answer(self, body: dict[str, Any]) -> Iterator[bytes]:
        choice = body["choices"][0]
        for piece in pieces(choice["message"]["content"] or ""):
            yield self._chunk(Delta(content=piece))
        cost = body["tandem"]["cost"]
        yield self._chunk(
            Delta(),
            finish_reason=choice["finish_reason"],
            tandem=ChunkTandem(job_id=self.wait.job_id, cost=cost),
        )
        if self.include_usage:
            chunk = ChatCompletionChunk(
                id=self.id, created=self.created, model=self.model, choices=[], usage=body["usage"]
            )
            yield _sse(_compact(chunk.model_dump(mode="json")))

    def _chunk(
        self, delta: Delta, finish_reason: str | None = None, tandem: ChunkTandem | None = None
    ) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],  # type: ignore[arg-type]
            tandem=tandem,
        )
        return _sse(_compact(chunk.model_dump(mode="json")))

    def _error(self, error: OpenAIError) -> bytes:
        body = error.body()
        body["error"]["job_id"] = self.wait.job_id
        return _sse(body)


def _compact(chunk: dict[str, Any]) -> dict[str, Any]:
    """A chunk as OpenAI sends it: a delta holds only what it says; no empty extension."""
    for choice in chunk["choices"]:
        choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    if chunk.get("tandem") is not None:
        chunk["tandem"] = {k: v for k, v in chunk["tandem"].items() if v is not None}
    else:
        chunk.pop("tandem", None)
    return chunk


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of about `size` characters, cut after whitespace where
    there is some (joined, they are `text` exactly)."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            if cut > start:
                end = cut + 1
        yield text[start:end]
        start = end
