"""`services.client.TandemClient` and its one retry policy, against real local HTTP servers:
a werkzeug app on a socket that answers from a script (503 / 429 with Retry-After, 409 on
a keyed upload, then 200), and a raw socket that drops connections unanswered."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from services.client import APIError, RetryPolicy, TandemClient
from tests.test_retry import serve  # one request per connection; None: dropped unanswered

FAST = RetryPolicy(first_pause_s=0.01, busy_attempts=5)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Script:
    """Answers the n-th request with the n-th (status, headers, JSON body); the last
    answer repeats. Records every request it saw."""

    answers: list[tuple[int, dict[str, str], Any]]
    seen: list[Seen] = field(default_factory=list)

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        request = Request(environ)
        body = request.get_data()
        self.seen.append(Seen(request.method, request.full_path.rstrip("?"), dict(request.headers), body))
        status, headers, payload = self.answers[min(len(self.seen), len(self.answers)) - 1]
        kind = "application/problem+json" if status >= 400 else "application/json"
        response = Response(json.dumps(payload), status, headers, content_type=kind)
        return response(environ, start_response)


@contextmanager
def serving(app: Callable) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)


def problem(status: int, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": "about:blank", "status": status, "detail": detail, **extra}


def test_busy_answers_are_waited_out_honouring_retry_after() -> None:
    script = Script(
        [
            (503, {"Retry-After": "1"}, problem(503, "the job queue is unavailable")),
            (429, {"Retry-After": "1"}, problem(429, "the queues are full")),
            (202, {}, {"id": "job_1", "status": "queued"}),
        ]
    )
    with serving(script) as url, TandemClient(url, "k", retry=FAST) as client:
        started = time.monotonic()
        job = client.submit_job("1 + 1?", "slm_only", {"seed": 1}, idempotency_key="row-1")
        waited = time.monotonic() - started
    assert job == {"id": "job_1", "status": "queued"}
    assert len(script.seen) == 3 and waited >= 2.0  # two Retry-After: 1 waits
    assert {s.headers["Idempotency-Key"] for s in script.seen} == {"row-1"}
    assert all(s.headers["Authorization"] == "Bearer k" for s in script.seen)
    assert json.loads(script.seen[-1].body) == {
        "question": "1 + 1?",
        "strategy": "slm_only",
        "params": {"seed": 1},
    }


def test_a_post_without_idempotency_key_is_sent_once() -> None:
    script = Script([(503, {"Retry-After": "0"}, problem(503, "broker down")), (202, {}, {})])
    with (
        serving(script) as url,
        TandemClient(url, "k", retry=FAST) as client,
        pytest.raises(APIError) as caught,
    ):
        client.submit_job("1 + 1?")
    assert len(script.seen) == 1
    assert caught.value.status == 503 and caught.value.detail == "broker down"
    assert str(caught.value) == "503: broker down"


def test_busy_waits_are_bounded() -> None:
    script = Script([(429, {"Retry-After": "0"}, problem(429, "rate limit"))])
    policy = RetryPolicy(first_pause_s=0.01, busy_attempts=2)
    with (
        serving(script) as url,
        TandemClient(url, "k", retry=policy) as client,
        pytest.raises(APIError, match=r"rate limit \(still 429 after 2 waits\)") as caught,
    ):
        client.get_job("job_1")
    assert len(script.seen) == 3 and caught.value.status == 429


def test_other_errors_are_not_retried_and_carry_the_problem(tmp_path: Path) -> None:
    errors = [{"line": 2, "error": "not JSON"}]
    script = Script([(400, {}, problem(400, "no valid line", errors=errors))])
    upload = tmp_path / "b.jsonl"
    upload.write_text("{}\n")
    with (
        serving(script) as url,
        TandemClient(url, "k", retry=FAST) as client,
        pytest.raises(APIError) as caught,
    ):
        client.upload_batch(upload, idempotency_key="u1")
    assert len(script.seen) == 1
    assert (caught.value.status, caught.value.detail) == (400, "no valid line")
    assert caught.value.problem["errors"] == errors


def test_an_upload_still_being_read_is_waited_for_and_resent_whole(tmp_path: Path) -> None:
    upload = tmp_path / "b.jsonl"
    upload.write_text("".join(json.dumps({"question": f"q{n}"}) + "\n" for n in range(500)))
    script = Script(
        [
            (409, {"Retry-After": "0"}, problem(409, "still being read", batch_id="b1")),
            (200, {}, {"id": "b1", "lines": {"total": 500}}),
        ]
    )
    with serving(script) as url, TandemClient(url, "k", retry=FAST) as client:
        created = client.upload_batch(upload, strategy="slm_only", params='{"seed": 2}')
    assert created["id"] == "b1" and len(script.seen) == 2
    first, second = script.seen
    assert first.body == second.body == upload.read_bytes()
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert first.headers["Content-Type"] == "application/jsonl"
    assert first.path == "/v1/batches?strategy=slm_only&params=%7B%22seed%22%3A+2%7D"


def test_a_conflict_without_retry_after_or_key_is_final() -> None:
    script = Script([(409, {}, problem(409, "job is finished"))])
    with (
        serving(script) as url,
        TandemClient(url, "k", retry=FAST) as client,
        pytest.raises(APIError, match="job is finished"),
    ):
        client.get_job("job_1")
    assert len(script.seen) == 1


def test_cancel_is_retried_as_idempotent() -> None:
    script = Script(
        [(503, {"Retry-After": "0"}, problem(503, "database down")), (200, {}, {"id": "b1"})]
    )
    with serving(script) as url, TandemClient(url, "k", retry=FAST) as client:
        assert client.cancel_batch("b1") == {"id": "b1"}
    assert [(s.method, s.path) for s in script.seen] == [("POST", "/v1/batches/b1/cancel")] * 2


def test_wait_polls_until_the_job_is_final() -> None:
    script = Script(
        [
            (200, {}, {"id": "j", "status": "queued"}),
            (503, {"Retry-After": "0"}, problem(503, "database down")),
            (200, {}, {"id": "j", "status": "running"}),
            (200, {}, {"id": "j", "status": "succeeded", "stages": []}),
        ]
    )
    with serving(script) as url, TandemClient(url, "k", retry=FAST) as client:
        job = client.wait_job("j", first_pause_s=0.01, max_pause_s=0.02)
        assert job["status"] == "succeeded" and len(script.seen) == 4
        script.answers = [(200, {}, {"id": "j", "status": "running"})]
        with pytest.raises(TimeoutError, match="did not finish"):
            client.wait_job("j", timeout_s=0.1, first_pause_s=0.01, max_pause_s=0.02)


def test_results_are_streamed_with_the_batch_status() -> None:
    body = b"".join(json.dumps({"line": n}).encode() + b"\n" for n in range(1, 2001))

    def app(environ: dict, start_response: Callable) -> Any:
        response = Response(body, 200, {"X-Batch-Status": "completed"})
        response.content_type = "application/jsonl"
        return response(environ, start_response)

    with (
        serving(app) as url,
        TandemClient(url, "k") as client,
        client.batch_results("b1") as stream,
    ):
        received = b"".join(stream.chunks)
    assert stream.batch_status == "completed" and received == body


# --- transport errors: a real socket that drops connections --------------------------------


def http_json(status: str, payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload).encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
    return (head + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data


def test_a_dropped_connection_is_retried_on_a_keyed_post() -> None:
    port, thread = serve([None, None, http_json("202 Accepted", {"id": "job_9"})])
    with TandemClient(f"http://127.0.0.1:{port}", "k", retry=FAST) as client:
        job = client.submit_job("q", idempotency_key="row-9")
    assert job == {"id": "job_9"}
    thread.join(5)


def test_a_dropped_connection_ends_an_unkeyed_post() -> None:
    port, thread = serve([None, http_json("202 Accepted", {"id": "job_9"})])
    with (
        TandemClient(f"http://127.0.0.1:{port}", "k", retry=FAST) as client,
        pytest.raises(APIError, match="cannot reach the API") as caught,
    ):
        client.submit_job("q")
    assert caught.value.status is None
    with TandemClient(f"http://127.0.0.1:{port}", "k", retry=FAST) as client:
        assert client.get_job("job_9") == {"id": "job_9"}  # the server's next answer
    thread.join(5)


def test_transport_retries_are_bounded() -> None:
    port, thread = serve([None, None])
    policy = RetryPolicy(transport_attempts=2, first_pause_s=0.01)
    with (
        TandemClient(f"http://127.0.0.1:{port}", "k", retry=policy) as client,
        pytest.raises(APIError, match=f"cannot reach the API at http://127.0.0.1:{port}"),
    ):
        client.get_batch("b1")
    thread.join(5)
