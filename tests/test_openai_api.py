"""The OpenAI surface in process, over real Postgres and Redis, without workers: how requests
map to jobs, the errors (OpenAI's shape, the right status, our message), models, files
(streamed both ways, memory flat), OpenAI batches on /v1/batches beside the native ones,
their output and error files, expiry, the wake-ups, and the API reference."""

from __future__ import annotations

import io
import json
import time
import tracemalloc
import uuid
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from services.api.openai import catalog, mapping
from services.api.openai.protocol import ChatMessage, OpenAIError

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def chat(**fields) -> dict:
    return {"model": "tandem", "messages": [user(QUESTION)], **fields}


# --- the mapping (no servers) -------------------------------------------------------------


def test_a_lone_user_message_is_the_question_as_it_is() -> None:
    job = mapping.parse_chat(chat(), 8000)
    assert job.request.question == QUESTION
    assert job.request.strategy == "tandem" and job.request.params.task == "text"
    assert not job.stream and not job.include_usage


def test_a_conversation_becomes_one_question() -> None:
    messages = [
        ChatMessage(role="system", content="Answer in one word."),
        ChatMessage(role="user", content="Capital of France?"),
        ChatMessage(role="assistant", content="Paris."),
        ChatMessage(role="developer", content=[{"type": "text", "text": "Be terse."}]),
        ChatMessage(role="user", content="And of Italy?", name="ann"),
    ]
    assert mapping.conversation_question(messages) == (
        "Instructions:\nAnswer in one word.\n\nBe terse.\n\n"
        "Conversation so far:\nUser: Capital of France?\n\nAssistant: Paris.\n\n"
        "Reply to this message:\nAnd of Italy?"
    )


def test_openai_fields_become_job_params() -> None:
    job = mapping.parse_chat(
        chat(model="tandem@economy", max_completion_tokens=64, temperature=0.7, top_p=0.9, seed=5),
        8000,
    ).request
    params = job.params
    assert (params.executor_max_tokens, params.llm_max_tokens, params.relay_budget) == (64, 64, 64)
    assert (params.temperature, params.top_p, params.seed) == (0.7, 0.9, 5)
    assert params.cost_preference == "economy"
    effort = mapping.parse_chat(chat(reasoning_effort="high", max_tokens=9), 8000).request
    assert effort.params.cost_preference == "quality" and effort.params.executor_max_tokens == 9
    extension = mapping.parse_chat(
        chat(model="fixed:7", tandem={"params": {"budgets": [0, 4], "task": "math"}}), 8000
    ).request
    assert extension.strategy == "fixed:7" and extension.params.task == "math"
    streamed = mapping.parse_chat(chat(stream=True, stream_options={"include_usage": True}), 8000)
    assert streamed.stream and streamed.include_usage


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"n": 2}, "n", "only n=1"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "no tools"),
        ({"logprobs": True}, "logprobs", "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format", "text"),
        ({"stop": ["\n"]}, "stop", "stop"),
        ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
        ({"temperature": 3}, "temperature", "between 0 and 2"),
        ({"seed": -1}, "seed", "seed"),
        ({"max_tokens": 0}, "max_tokens", "between 1"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens", "differ"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
        ({"colour": "red"}, "colour", "Unrecognized request argument"),
        ({"messages": []}, "messages", "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0].type", "only text"),
        ({"messages": [user("hi"), {"role": "assistant", "content": "ok"}]}, "messages", "last message"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "t"}, user("hi")]},
         "messages[0].role", "tool"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "Invalid value"),
        ({"model": "tandem@economy", "reasoning_effort": "low"}, "reasoning_effort", "operating point"),
        ({"messages": [user("x" * 9000)]}, "messages", "the conversation is 9000 characters"),
        ({"tandem": {"params": {"budgets": [5, 1]}}}, "tandem.params", "increasing"),
    ],
)
def test_refusals_name_the_field(fields: dict, param: str, fragment: str) -> None:
    with pytest.raises(OpenAIError) as caught:
        mapping.parse_chat(chat(**fields), 8000)
    assert caught.value.status == 400 and caught.value.param == param
    assert fragment in caught.value.message, caught.value.message
    assert caught.value.body()["error"]["type"] == "invalid_request_error"


def test_models_resolve_and_round_trip() -> None:
    assert [m.id for m in catalog.listed()] == [
        "tandem",
        "tandem@quality",
        "tandem@balanced",
        "tandem@economy",
        "llm_only",
        "slm_only",
        "scot",
        "relay",
    ]
    for name in ("tandem@0.25", "fixed:100", "scot"):
        choice = catalog.resolve(name)
        request = mapping.parse_chat(chat(model=name), 8000).request
        assert catalog.model_of(request.strategy, request.params) == name, choice
    assert catalog.model_of("tandem", mapping.parse_chat(chat(model="tandem@balanced"), 8000).request.params) == "tandem"
    for bad in ("gpt-4o", "slm_only@economy", "tandem@", "tandem@lots", "tandem@-1", "fixed:x"):
        with pytest.raises(OpenAIError) as caught:
            catalog.resolve(bad)
        assert caught.value.status == 404 and caught.value.code == "model_not_found"
        assert "does not exist" in caught.value.message and "tandem@economy" in caught.value.message


def test_answer_pieces_join_to_the_answer() -> None:
    from services.api.openai.chat_completions import pieces

    text = "word " * 40 + "x" * 130 + "\nend"
    parts = list(pieces(text))
    assert "".join(parts) == text and len(parts) > 4 and all(len(p) <= 48 for p in parts)
    assert list(pieces("")) == []


def test_batch_lines_are_checked_like_requests() -> None:
    endpoint = "/v1/chat/completions"
    line = {"custom_id": "a", "method": "POST", "url": endpoint, "body": chat()}
    custom_id, request = mapping.parse_batch_line(line, endpoint, 8000, 200)
    assert custom_id == "a" and request.question == QUESTION  # type: ignore[union-attr]
    cases = [
        ({**line, "url": "/v1/embeddings"}, "url"),
        ({**line, "method": "GET"}, "method"),
        ({**line, "extra": 1}, "extra"),
        ({**line, "custom_id": ""}, "custom_id"),
        ({**line, "body": chat(model="nope")}, "body.model"),
        ({**line, "body": chat(stream=True)}, "body.stream"),
        ({**line, "body": chat(n=3)}, "body.n"),
    ]
    for data, param in cases:
        _custom_id, refusal = mapping.parse_batch_line(data, endpoint, 8000, 200)
        assert isinstance(refusal, mapping.LineRefusal) and refusal.param == param, (data, refusal)
    _, unknown = mapping.parse_batch_line({**line, "body": chat(model="nope")}, endpoint, 8000, 200)
    assert mapping.line_status(unknown.code) == 404  # type: ignore[union-attr]


# --- the app --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published() -> list:
    return []


@pytest.fixture(scope="module")
def app(in_process_settings, published: list):
    from services.api import create_app

    config = in_process_settings.model_copy(update={"openai_wait_s": 1.0, "rate_limit_per_minute": 0})
    application = create_app(config, enqueue=published.extend)
    application.config["TESTING"] = False  # errors go through the handlers
    return application


@pytest.fixture(scope="module")
def client(app) -> FlaskClient:
    return app.test_client()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def openai_error(response, status: int, fragment: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"], error
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in response.get_data(as_text=True)
    return error


def test_errors_are_openai_shaped_with_the_right_status(client: FlaskClient, api_key: str) -> None:
    error = openai_error(client.get("/v1/models"), 401, "missing API key")
    assert error["code"] == "invalid_api_key"
    openai_error(client.get("/v1/models", headers=auth("tdm_wrong")), 401, "invalid or revoked")
    headers = auth(api_key)
    error = openai_error(
        client.post("/v1/chat/completions", json=chat(model="gpt-4o"), headers=headers),
        404,
        "The model 'gpt-4o' does not exist",
        "model",
    )
    assert error["code"] == "model_not_found"
    openai_error(
        client.post("/v1/chat/completions", data="{", headers={**headers, "Content-Type": "application/json"}),
        400,
        "could not parse the JSON",
    )
    openai_error(client.post("/v1/chat/completions", data="x", headers=headers), 415, "JSON body")
    openai_error(client.post("/v1/chat/completions", json=chat(n=4), headers=headers), 400, "n=1", "n")
    openai_error(client.get("/v1/models/nope", headers=headers), 404, "does not exist", "model")


def test_models_list_and_retrieve(client: FlaskClient, api_key: str) -> None:
    listed = client.get("/v1/models", headers=auth(api_key)).get_json()
    assert listed["object"] == "list"
    ids = [model["id"] for model in listed["data"]]
    assert "tandem@economy" in ids and "relay" in ids
    assert all(m["object"] == "model" and m["owned_by"] == "tandem" for m in listed["data"])
    one = client.get("/v1/models/fixed:100", headers=auth(api_key)).get_json()
    assert one["id"] == "fixed:100" and one["tandem"]["strategy"] == "fixed:100"


def test_a_chat_completion_is_a_job_and_past_the_wait_limit_504(
    client: FlaskClient, api_key: str, published: list
) -> None:
    started = time.monotonic()
    response = client.post(
        "/v1/chat/completions", json=chat(model="slm_only", max_tokens=5), headers=auth(api_key)
    )
    error = openai_error(response, 504, "did not finish within 1 s")
    assert time.monotonic() - started < 5
    assert error["code"] == "job_timeout" and response.headers["x-should-retry"] == "false"
    job_id = response.headers["X-Tandem-Job-Id"]
    assert job_id in error["message"]
    job = client.get(f"/v1/jobs/{job_id}", headers=auth(api_key)).get_json()
    assert job["status"] == "queued" and job["strategy"] == "slm_only"  # it goes on
    assert job["params"] == {
        "executor_max_tokens": 5,
        "llm_max_tokens": 5,
        "relay_budget": 5,
        "task": "text",
    }
    assert any(task.job_id == job_id and task.queue == "executor" for task in published)


def test_a_stream_that_waits_too_long_ends_with_an_error_event(in_process_settings, api_key: str) -> None:
    from services.api import create_app

    config = in_process_settings.model_copy(update={"openai_wait_s": 2.5})
    client = create_app(config, enqueue=lambda tasks: None).test_client()
    response = client.post(
        "/v1/chat/completions",
        json=chat(model="slm_only", stream=True, max_tokens=5),
        headers=auth(api_key),
    )
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = [e for e in response.get_data(as_text=True).split("\n\n") if e]
    data = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert data[0]["object"] == "chat.completion.chunk"
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert data[-1]["error"]["code"] == "job_timeout"
    assert events[-1] == "data: [DONE]"
    assert any(e.startswith(":") for e in events)  # the heartbeat comments


# --- files ----------------------------------------------------------------------------------


def upload(client: FlaskClient, key: str, content: bytes, purpose: str = "batch", name: str = "in.jsonl"):
    return client.post(
        "/v1/files",
        data={"purpose": purpose, "file": (io.BytesIO(content), name)},
        headers=auth(key),
        content_type="multipart/form-data",
    )


def test_files_upload_list_read_delete_and_stay_private(
    client: FlaskClient, api_key: str, other_key: str
) -> None:
    content = b'{"a": 1}\n' * 1000 + "é\n".encode()
    created = upload(client, api_key, content).get_json()
    assert created["object"] == "file" and created["bytes"] == len(content)
    assert created["purpose"] == "batch" and created["filename"] == "in.jsonl"
    file_id = created["id"]
    assert client.get(f"/v1/files/{file_id}", headers=auth(api_key)).get_json() == created
    body = client.get(f"/v1/files/{file_id}/content", headers=auth(api_key))
    assert body.data == content and body.headers["Content-Length"] == str(len(content))
    listed = client.get("/v1/files?limit=1", headers=auth(api_key)).get_json()
    assert listed["data"][0]["id"] == file_id and listed["first_id"] == file_id
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        openai_error(client.get(path, headers=auth(other_key)), 404, "No such File object")
    openai_error(client.delete(f"/v1/files/{file_id}", headers=auth(other_key)), 404, "No such File")
    theirs = client.get("/v1/files", headers=auth(other_key)).get_json()["data"]
    assert file_id not in {f["id"] for f in theirs}
    deleted = client.delete(f"/v1/files/{file_id}", headers=auth(api_key)).get_json()
    assert deleted == {"id": file_id, "object": "file", "deleted": True}
    openai_error(client.get(f"/v1/files/{file_id}", headers=auth(api_key)), 404, "No such File")


def test_file_list_pages_with_after_and_order(client: FlaskClient, api_key: str) -> None:
    ids = [upload(client, api_key, b"x\n").get_json()["id"] for _ in range(3)]
    seen, after = [], None
    while True:
        query = "/v1/files?limit=2" + (f"&after={after}" if after else "")
        page = client.get(query, headers=auth(api_key)).get_json()
        seen += [f["id"] for f in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert [i for i in seen if i in ids] == list(reversed(ids))
    ascending = client.get("/v1/files?order=asc&limit=10000", headers=auth(api_key)).get_json()
    assert [f["id"] for f in ascending["data"] if f["id"] in ids] == ids
    openai_error(client.get("/v1/files?order=up", headers=auth(api_key)), 400, "order", "order")
    openai_error(client.get("/v1/files?after=file-nope", headers=auth(api_key)), 400, "no file", "after")


def test_bad_uploads_are_refused(client: FlaskClient, api_key: str) -> None:
    openai_error(upload(client, api_key, b"x", purpose="fine-tune"), 400, "not supported", "purpose")
    openai_error(upload(client, api_key, b""), 400, "empty", "file")
    no_file = client.post(
        "/v1/files", data={"purpose": "batch"}, headers=auth(api_key), content_type="multipart/form-data"
    )
    openai_error(no_file, 400, "'file'", "file")
    openai_error(
        client.post("/v1/files", data=b"abc", headers={**auth(api_key), "Content-Type": "text/plain"}),
        415,
        "multipart",
    )
    broken = client.post(
        "/v1/files",
        data=b"--xx\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nabc",
        headers={**auth(api_key), "Content-Type": "multipart/form-data; boundary=xx"},
    )
    openai_error(broken, 400, "malformed multipart")


class _MultipartBody(io.RawIOBase):
    """A multipart upload of `size` bytes made as it is read (never whole in memory)."""

    def __init__(self, size: int, boundary: str) -> None:
        head = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self._parts: Iterator[bytes] = iter([head, *self._body(size), f"\r\n--{boundary}--\r\n".encode()])
        self._current = b""
        self.length = len(head) + size + len(f"\r\n--{boundary}--\r\n")

    @staticmethod
    def _body(size: int) -> Iterator[bytes]:
        line = b'{"custom_id": "x", "payload": "' + b"z" * 990 + b'"}\n'
        sent = 0
        while sent < size:
            piece = (line * 64)[: size - sent]
            sent += len(piece)
            yield piece

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not self._current:
            self._current = next(self._parts, b"")
            if not self._current:
                return 0
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n


def test_a_large_file_streams_in_and_out_in_flat_memory(
    in_process_settings, api_key: str
) -> None:
    """80 MiB, more than TANDEM_MAX_BODY_BYTES allows other bodies: in and out with the
    process's Python allocations staying under 16 MiB; over TANDEM_MAX_FILE_BYTES, 413."""
    from services.api import create_app

    size = 80 * 1024 * 1024
    config = in_process_settings.model_copy(
        update={"max_body_bytes": 1024 * 1024, "max_file_bytes": 100 * 1024 * 1024}
    )
    client = create_app(config, enqueue=lambda tasks: None).test_client()
    body = _MultipartBody(size, "bnd")
    tracemalloc.start()
    try:
        response = client.post(
            "/v1/files",
            headers={**auth(api_key), "Content-Type": "multipart/form-data; boundary=bnd"},
            environ_overrides={
                "wsgi.input": body,
                "CONTENT_LENGTH": str(body.length),
                "CONTENT_TYPE": "multipart/form-data; boundary=bnd",
            },
        )
        _, upload_peak = tracemalloc.get_traced_memory()
        assert response.status_code == 200, response.get_data(as_text=True)
        created = response.get_json()
        assert created["bytes"] == size
        tracemalloc.reset_peak()
        download = client.get(f"/v1/files/{created['id']}/content", headers=auth(api_key), buffered=False)
        total = 0
        for chunk in download.response:
            total += len(chunk)
        download.close()
        _, download_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    print(f"\n80 MiB file: peak Python memory {upload_peak / 2**20:.1f} MiB in, {download_peak / 2**20:.1f} MiB out")
    assert upload_peak < 16 * 2**20 and download_peak < 16 * 2**20
    small = create_app(
        in_process_settings.model_copy(update={"max_file_bytes": 1 << 20}), enqueue=lambda t: None
    ).test_client()
    over = _MultipartBody(2 << 20, "bnd")
    response = small.post(
        "/v1/files",
        headers={**auth(api_key), "Content-Type": "multipart/form-data; boundary=bnd"},
        environ_overrides={
            "wsgi.input": over,
            "CONTENT_LENGTH": str(over.length),
            "CONTENT_TYPE": "multipart/form-data; boundary=bnd",
        },
    )
    openai_error(response, 413, "too large")


# --- OpenAI batches beside native ones --------------------------------------------------------


def batch_line(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": chat(**{"model": "slm_only", "max_tokens": 4, **body})}


def jsonl(*lines) -> bytes:
    return b"".join((json.dumps(x) if isinstance(x, dict) else x).encode() + b"\n" for x in lines)


def create_batch(client: FlaskClient, key: str, content: bytes, **fields):
    file_id = upload(client, key, content).get_json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **fields}
    return client.post("/v1/batches", json=body, headers=auth(key))


def dual_error(response, status: int, fragment: str) -> dict:
    """An error on /v1/batches: a problem with OpenAI's error inside."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["status"] == status and fragment in body["detail"]
    assert body["error"]["message"] == body["detail"]
    return body


def test_an_openai_batch_runs_valid_lines_and_reports_bad_ones(
    client: FlaskClient, api_key: str, in_process_settings
) -> None:
    content = jsonl(
        batch_line("a"),
        "not json",
        batch_line("b", model="gpt-4o"),
        batch_line("c", temperature=0.5),
        batch_line("a"),  # a duplicate custom_id
    )
    response = create_batch(client, api_key, content, metadata={"run": "nightly"})
    assert response.status_code == 200, response.get_data(as_text=True)
    batch = response.get_json()
    assert batch["object"] == "batch" and batch["status"] == "in_progress"
    assert batch["endpoint"] == "/v1/chat/completions" and batch["completion_window"] == "24h"
    assert batch["metadata"] == {"run": "nightly"}
    assert batch["expires_at"] - batch["created_at"] == 24 * 3600
    assert batch["request_counts"] == {"total": 5, "completed": 0, "failed": 3}
    errors = {e["line"]: e for e in batch["errors"]["data"]}
    assert set(errors) == {2, 3, 5}
    assert errors[3]["param"] == "body.model" and errors[3]["code"] == "model_not_found"
    assert "duplicate custom_id" in errors[5]["message"]
    assert batch["tandem"]["lines"] == {"total": 5, "valid": 2, "invalid": 3}
    jobs = client.get(f"/v1/jobs?batch_id={batch['id']}", headers=auth(api_key)).get_json()["data"]
    assert sorted(j["custom_id"] for j in jobs) == ["a", "c"]
    assert all(j["params"]["task"] == "text" and j["strategy"] == "slm_only" for j in jobs)
    # Read back in the shape of the API that made it; native batches stay native.
    read = client.get(f"/v1/batches/{batch['id']}", headers=auth(api_key)).get_json()
    assert read["input_file_id"] == batch["input_file_id"] and isinstance(read["created_at"], int)
    native = client.post(
        "/v1/batches",
        data=json.dumps({"custom_id": "n", "question": QUESTION}),
        headers={**auth(api_key), "Content-Type": "application/jsonl"},
    ).get_json()
    assert client.get(f"/v1/batches/{native['id']}", headers=auth(api_key)).get_json()["lines"]["total"] == 1
    page = client.get("/v1/batches?limit=2", headers=auth(api_key)).get_json()
    assert [b["id"] for b in page["data"]] == [native["id"], batch["id"]]
    assert "lines" in page["data"][0] and "input_file_id" in page["data"][1]
    assert page["first_id"] == native["id"] and page["last_id"] == batch["id"]
    after = client.get(f"/v1/batches?limit=1&after={native['id']}", headers=auth(api_key)).get_json()
    assert after["data"][0]["id"] == batch["id"]
    first = client.get("/v1/batches?limit=1", headers=auth(api_key)).get_json()
    cursor = client.get(f"/v1/batches?limit=1&cursor={first['next_cursor']}", headers=auth(api_key))
    [shown] = cursor.get_json()["data"]  # the native list: every batch in the native shape
    assert shown["id"] == batch["id"] and shown["lines"]["total"] == 5
    # Cancel: queued jobs end at once.
    cancelled = client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth(api_key)).get_json()
    assert cancelled["status"] in ("cancelling", "cancelled") and cancelled["cancelling_at"]
    final = until(lambda: client.get(f"/v1/batches/{batch['id']}", headers=auth(api_key)).get_json(),
                  lambda b: b["status"] == "cancelled")
    assert final["status"] == "cancelled" and final["output_file_id"] is None
    lines = [json.loads(x) for x in client.get(
        f"/v1/files/{final['error_file_id']}/content", headers=auth(api_key)).data.splitlines()]
    assert [(x["custom_id"], (x["error"] or {}).get("code")) for x in lines] == [
        ("a", "batch_cancelled"), (None, None), ("b", None), ("c", "batch_cancelled"), ("a", None)
    ]
    assert lines[2]["response"]["status_code"] == 404
    assert lines[2]["response"]["body"]["error"]["code"] == "model_not_found"
    assert lines[1]["response"]["status_code"] == 400


def test_openai_batch_requests_refused_in_both_shapes(
    client: FlaskClient, api_key: str, other_key: str
) -> None:
    headers = auth(api_key)
    body = {"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    dual_error(client.post("/v1/batches", json=body, headers=headers), 404, "No such File object")
    dual_error(client.post("/v1/batches", json={**body, "endpoint": "/v1/embeddings"}, headers=headers), 400, "endpoint")
    dual_error(client.post("/v1/batches", json={**body, "completion_window": "1h"}, headers=headers), 400, "24h")
    dual_error(client.post("/v1/batches", json={**body, "metadata": {str(i): "v" for i in range(17)}},
                           headers=headers), 400, "16 pairs")
    dual_error(client.post("/v1/batches", json={"input_file_id": "x"}, headers=headers), 400, "endpoint")
    dual_error(client.post("/v1/batches", json={"custom_id": "a", "question": "q"}, headers=headers),
               415, "application/jsonl")
    dual_error(client.post("/v1/batches", json=body), 401, "missing API key")
    dual_error(client.get("/v1/batches/batch_nope", headers=headers), 404, "no batch")
    mine = create_batch(client, api_key, jsonl(batch_line("q"))).get_json()
    dual_error(client.get(f"/v1/batches/{mine['id']}", headers=auth(other_key)), 404, "no batch")
    dual_error(client.post(f"/v1/batches/{mine['id']}/cancel", headers=auth(other_key)), 404, "no batch")
    theirs = client.get("/v1/batches", headers=auth(other_key)).get_json()["data"]
    assert mine["id"] not in {b["id"] for b in theirs}
    # A file of another key is not there for a batch either.
    file_id = mine["input_file_id"]
    dual_error(client.post("/v1/batches", json={**body, "input_file_id": file_id}, headers=auth(other_key)),
               404, "No such File object")
    failed = create_batch(client, api_key, jsonl("nope", batch_line("z", model="gpt-4o"))).get_json()
    assert failed["status"] == "failed" and failed["failed_at"]
    assert {e["line"] for e in failed["errors"]["data"]} == {1, 2}


def until(read, done, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def _play_workers(database_url: str, batch_id: str, outcomes: dict[str, str]) -> None:
    """Give the batch's jobs (by custom_id) a final status and a stage, as workers would."""
    from sqlalchemy import select

    from services.core.steps import Outcome, StageRecord
    from services.storage import job_rows, stage_rows
    from services.storage.db import transaction
    from services.storage.models import Job

    with transaction(database_url) as session:
        for job in session.scalars(select(Job).where(Job.batch_id == batch_id)):
            status = outcomes.get(job.custom_id)
            if status is None:
                continue
            output = {"text": f"answer {job.custom_id}", "finish_reason": "length"}
            record = StageRecord(seq=0, kind="executor", role="executor", model="m",
                                 prompt_tokens=10, cached_prompt_tokens=2, generated_tokens=4,
                                 tflops=0.5, output=output)
            stage_rows.add_stage(session, job.id, record)
            if status == "succeeded":
                outcome = Outcome(answer=output["text"], final_text=output["text"])
                job_rows.mark_succeeded(session, job.id, outcome)
            else:
                job_rows.mark_failed(session, job.id, "model fell over")


def test_finished_batch_output_and_error_files(
    client: FlaskClient, api_key: str, in_process_settings
) -> None:
    content = jsonl(batch_line("ok"), batch_line("bad", model="nope"), batch_line("boom"))
    batch = create_batch(client, api_key, content).get_json()
    _play_workers(in_process_settings.database_url, batch["id"], {"ok": "succeeded", "boom": "failed"})
    # A read finalizes it (unless the feeder is finalizing it this instant: then it shows
    # `finalizing` until the feeder is done).
    done = until(lambda: client.get(f"/v1/batches/{batch['id']}", headers=auth(api_key)).get_json(),
                 lambda b: b["status"] not in ("in_progress", "finalizing"))
    assert done["status"] == "completed" and done["completed_at"]
    assert done["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    assert done["usage"]["input_tokens"] == 20 and done["usage"]["output_tokens"] == 8
    output = client.get(f"/v1/files/{done['output_file_id']}", headers=auth(api_key)).get_json()
    assert output["purpose"] == "batch_output"
    [line] = [json.loads(x) for x in client.get(
        f"/v1/files/{done['output_file_id']}/content", headers=auth(api_key)).data.splitlines()]
    assert line["custom_id"] == "ok" and line["error"] is None
    assert line["id"].startswith("batch_req_") and line["response"]["status_code"] == 200
    completion = line["response"]["body"]
    assert completion["object"] == "chat.completion" and completion["model"] == "slm_only"
    assert completion["choices"][0]["message"]["content"] == "answer ok"
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                                   "prompt_tokens_details": {"cached_tokens": 2}}
    assert completion["tandem"]["job_id"] == line["response"]["request_id"]
    errors = [json.loads(x) for x in client.get(
        f"/v1/files/{done['error_file_id']}/content", headers=auth(api_key)).data.splitlines()]
    assert [e["custom_id"] for e in errors] == ["bad", "boom"]
    assert errors[1]["response"]["status_code"] == 500
    assert "model fell over" in errors[1]["response"]["body"]["error"]["message"]
    listed = client.get("/v1/files?purpose=batch_output", headers=auth(api_key)).get_json()["data"]
    assert {done["output_file_id"], done["error_file_id"]} <= {f["id"] for f in listed}


def test_a_batch_past_its_window_expires_keeping_what_finished(
    client: FlaskClient, api_key: str, in_process_settings
) -> None:
    from sqlalchemy import text

    from services.batches.lifecycle import expire_overdue, finalize_if_done
    from services.storage.db import transaction

    url = in_process_settings.database_url
    batch = create_batch(client, api_key, jsonl(batch_line("done"), batch_line("late"))).get_json()
    _play_workers(url, batch["id"], {"done": "succeeded"})
    with transaction(url) as session:  # the window passes
        session.execute(text("UPDATE batches SET expires_at = now() - interval '1 second' WHERE id = :id"),
                        {"id": batch["id"]})
    until(lambda: expire_overdue(url), lambda n: n >= 1)  # (the feeder may hold the row)
    until(lambda: finalize_if_done(url, batch["id"]), bool)
    expired = client.get(f"/v1/batches/{batch['id']}", headers=auth(api_key)).get_json()
    assert expired["status"] == "expired" and expired["expired_at"]
    assert expired["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    kept = client.get(f"/v1/files/{expired['output_file_id']}/content", headers=auth(api_key)).data
    assert json.loads(kept)["custom_id"] == "done"
    [late] = [json.loads(x) for x in client.get(
        f"/v1/files/{expired['error_file_id']}/content", headers=auth(api_key)).data.splitlines()]
    assert late["custom_id"] == "late" and late["error"]["code"] == "batch_expired"
    assert late["response"] is None


# --- wake-ups -------------------------------------------------------------------------------


def test_a_job_change_wakes_its_waiter_and_batch_jobs_do_not_notify(in_process_settings) -> None:
    from sqlalchemy import text

    from services.api.openai.waiting import JobEvents
    from services.core.requests import parse_job_request
    from services.storage import job_rows
    from services.storage.db import transaction

    url = in_process_settings.database_url
    with transaction(url) as session:
        job = job_rows.new_job("alice", parse_job_request({"question": QUESTION}, 8000))
        job.id = "job_" + uuid.uuid4().hex
        session.add(job)
    events = JobEvents(url)
    with events.watch(job.id) as wake:
        deadline = time.monotonic() + 10
        while not events.listening and time.monotonic() < deadline:
            time.sleep(0.05)
        assert events.listening
        wake.clear()
        with transaction(url) as session:
            session.execute(text("UPDATE jobs SET updated_at = now() WHERE id = :id"), {"id": job.id})
        started = time.monotonic()
        assert wake.wait(5)
        latency = time.monotonic() - started
        print(f"\nwake-up after a job's update commits: {latency * 1000:.1f} ms")
        assert latency < 1.0
    assert events.pause(0) == 5.0  # listening: the poll is only a safety net
    assert JobEvents("sqlite:///x.db").pause(0) == 0.05  # no notifications: a backoff


# --- the reference ----------------------------------------------------------------------------


def test_the_reference_documents_true_codes_and_typed_schemas(client: FlaskClient, api_key: str) -> None:
    from jsonschema import Draft202012Validator
    from openapi_spec_validator import validate
    from referencing import Registry
    from referencing.jsonschema import DRAFT202012

    document = client.get("/openapi.json").get_json()
    validate(document)
    paths = document["paths"]
    assert set(paths["/v1/jobs/{job_id}"]["get"]["responses"]) == {"200", "401", "404", "429", "503"}
    assert set(paths["/v1/chat/completions"]["post"]["responses"]) == {
        "200", "400", "401", "404", "409", "413", "415", "429", "500", "503", "504"
    }
    post_batches = paths["/v1/batches"]["post"]
    assert {"application/json", "application/jsonl"} <= set(post_batches["requestBody"]["content"])
    one_of = paths["/v1/batches/{batch_id}"]["get"]["responses"]["200"]["content"]["application/json"]
    assert len(one_of["schema"]["oneOf"]) == 2
    registry = Registry().with_resource("urn:doc", DRAFT202012.create_resource(document))

    def check(name: str, instance: dict) -> None:
        schema = {"$ref": f"urn:doc#/components/schemas/{name}"}
        errors = list(Draft202012Validator(schema, registry=registry).iter_errors(instance))
        assert not errors, (name, [e.message for e in errors][:3])

    headers = auth(api_key)
    check("ModelList", client.get("/v1/models", headers=headers).get_json())
    file = upload(client, api_key, jsonl(batch_line("s"))).get_json()
    check("FileObject", file)
    check("FileList", client.get("/v1/files?limit=3", headers=headers).get_json())
    batch = client.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                                             "completion_window": "24h"}, headers=headers).get_json()
    check("OpenAIBatch", batch)
    check("BatchList", client.get("/v1/batches?limit=5", headers=headers).get_json())
    job_id = client.get(f"/v1/jobs?batch_id={batch['id']}", headers=headers).get_json()["data"][0]["id"]
    check("Job", client.get(f"/v1/jobs/{job_id}", headers=headers).get_json())
    check("JobPage", client.get("/v1/jobs?limit=2", headers=headers).get_json())
    native = client.post("/v1/batches", data=json.dumps({"custom_id": "n", "question": QUESTION}),
                         headers={**headers, "Content-Type": "application/jsonl"}).get_json()
    check("Batch", native)
    check("ErrorResponse", client.get("/v1/models/nope", headers=headers).get_json())


def test_the_reference_page_is_swagger_ui_served_offline(client: FlaskClient) -> None:
    page = client.get("/docs").get_data(as_text=True)
    assert "openapi.json" in client.get("/docs/init.js").get_data(as_text=True)
    assert "openapi.json" in page or "/docs/init.js" in page
    assert "http://" not in page and "https://" not in page  # nothing from a CDN
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        response = client.get(f"/docs/assets/{asset}")
        assert response.status_code == 200 and len(response.data) > 10_000
        response.close()
    assert client.get("/docs/assets/../../settings.py").status_code == 404
