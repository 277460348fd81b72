"""The OpenAI surface end to end, with the clients people use: the official `openai` SDK
and LiteLLM against the real API and worker processes (one per role, the reconciler),
real Postgres and Redis, the real default model with tiny token budgets."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import infra

pytestmark = [pytest.mark.slow, pytest.mark.model]

openai = pytest.importorskip("openai", reason="dev extra: pip install -e '.[dev]'")

QUESTION = "Name a colour of the sky."
TINY = {"budgets": [0, 6], "policy": "entropy", "cost_preference": "quality"}


class Stack:
    def __init__(self, processes: infra.Processes, base_url: str, key: str, other_key: str) -> None:
        self.processes = processes
        self.base_url = base_url
        self.key = key
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        self.sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=180)
        self.other = openai.OpenAI(base_url=f"{base_url}/v1", api_key=other_key, max_retries=0)

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/v1/jobs/{job_id}").json()

    def until(self, read, done, timeout: float = 240, what: str = "it"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = read()
            if done(value):
                return value
            time.sleep(0.3)
        logs = {name: self.processes.log(name)[-1500:] for name in self.processes.running}
        raise AssertionError(f"timed out waiting for {what}: {value}; logs: {logs}")


@pytest.fixture(scope="module")
def stack(service_env, api_key, other_key, tmp_path_factory) -> Iterator[Stack]:
    log_dir = Path(tmp_path_factory.mktemp("logs"))
    processes = infra.Processes(service_env, log_dir)
    port = infra.free_port()
    try:
        for queue in ("coordinator", "classifier", "executor"):
            processes.worker(queue)
        processes.start("reconciler", [str(infra.BIN / "tandem"), "reconcile", "--interval", "1"])
        processes.api(port)
        yield Stack(processes, f"http://127.0.0.1:{port}", api_key, other_key)
    finally:
        processes.stop_all()


def test_models_list(stack: Stack) -> None:
    models = stack.sdk.models.list()
    ids = [model.id for model in models]
    assert {"tandem", "tandem@economy", "llm_only", "slm_only", "scot", "relay"} <= set(ids)
    assert stack.sdk.models.retrieve("fixed:50").id == "fixed:50"


def test_chat_completion_is_a_job_with_its_usage(stack: Stack) -> None:
    from openai.types.chat import ChatCompletion

    completion = stack.sdk.chat.completions.create(
        model="tandem@quality",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
        max_tokens=8,
        seed=3,
        extra_body={"tandem": {"params": TINY}},
    )
    ChatCompletion.model_validate(completion.model_dump())  # strictly OpenAI's type
    assert completion.object == "chat.completion" and completion.model == "tandem@quality"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    extension = completion.model_extra["tandem"]
    job = stack.job(extension["job_id"])
    assert job["status"] == "succeeded" and job["question"].startswith("Instructions:\nBe brief.")
    assert job["params"]["executor_max_tokens"] == 8 and job["params"]["seed"] == 3
    assert choice.message.content == job["answer"]
    usage = completion.usage
    assert usage.prompt_tokens == job["cost"]["prompt_tokens"]
    assert usage.completion_tokens == job["cost"]["generated_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert [s["kind"] for s in extension["stages"]] == [s["kind"] for s in job["stages"]]
    assert extension["cost"]["tflops"] == pytest.approx(job["cost"]["tflops"])
    assert len(job["stages"]) >= 2  # the classifier's stage 0, then the executor (at least)


def test_streamed_completion_chunks_parse_and_end_with_done(stack: Stack) -> None:
    from openai.types.chat import ChatCompletionChunk

    stream = stack.sdk.chat.completions.create(
        model="slm_only",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    assert chunks[0].choices[0].delta.role == "assistant"
    job_id = chunks[0].model_extra["tandem"]["job_id"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    job = stack.job(job_id)
    assert job["status"] == "succeeded" and text == job["answer"]
    # The raw stream: Server-Sent Events ending with [DONE].
    body = {"model": "slm_only", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "stream": True}
    with stack.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_a_streaming_client_that_disconnects_cancels_its_job(stack: Stack) -> None:
    body = {
        "model": "slm_only",
        "messages": [{"role": "user", "content": "Write a long story about the sea, in many chapters."}],
        "max_tokens": 2000,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {stack.key}"}
    with (
        httpx.Client(base_url=stack.base_url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response,
    ):
        job_id = response.headers["X-Tandem-Job-Id"]
        lines = response.iter_lines()  # kept: dropping the iterator closes the connection
        first = next(lines)
        assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
        stack.until(lambda: stack.job(job_id)["status"], lambda s: s == "running", 120, "the job to run")
        assert next(lines) is not None  # still streaming: a stage chunk or a heartbeat
    # leaving the block closed the connection mid-stream
    done = stack.until(lambda: stack.job(job_id), lambda j: j["status"] in ("succeeded", "failed", "cancelled"),
                       120, "the job to end")
    assert done["status"] == "cancelled" and done["cancel_requested"]


def test_a_waiting_client_that_gives_up_cancels_its_job(stack: Stack) -> None:
    """Not streamed: the API sees the closed socket under the waiting request (gunicorn)."""
    body = {
        "model": "slm_only",
        "messages": [{"role": "user", "content": "Write a long story about a mountain, in many chapters."}],
        "max_tokens": 2000,
    }
    before = {j["id"] for j in stack.http.get("/v1/jobs?strategy=slm_only&limit=200").json()["data"]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=4),
                   headers={"Authorization": f"Bearer {stack.key}"})
    jobs = stack.http.get("/v1/jobs?strategy=slm_only&limit=200").json()["data"]
    [job_id] = [j["id"] for j in jobs if j["id"] not in before]
    done = stack.until(lambda: stack.job(job_id), lambda j: j["status"] in ("succeeded", "failed", "cancelled"),
                       120, "the job to end")
    assert done["status"] == "cancelled"


def test_unknown_model_and_other_keys_things_are_not_found(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        stack.sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "The model 'gpt-4o' does not exist" in caught.value.message
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        stack.sdk.chat.completions.create(model="tandem", messages=[{"role": "user", "content": "hi"}], n=2)
    assert "only n=1" in bad.value.message and bad.value.param == "n"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="tdm_wrong", max_retries=0).models.list()
    line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "slm_only", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}}
    file = stack.sdk.files.create(file=("mine.jsonl", json.dumps(line).encode() + b"\n"), purpose="batch")
    batch = stack.sdk.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError) as theirs:
        stack.other.files.retrieve(file.id)
    assert "No such File object" in theirs.value.message
    with pytest.raises(openai.NotFoundError):
        stack.other.files.content(file.id)
    with pytest.raises(openai.NotFoundError) as batch_theirs:
        stack.other.batches.retrieve(batch.id)
    assert "no batch" in batch_theirs.value.message
    with pytest.raises(openai.NotFoundError):
        stack.other.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        stack.other.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")


def _lines(stack: Stack, file_id: str) -> list[dict]:
    return [json.loads(line) for line in stack.sdk.files.content(file_id).read().splitlines()]


def test_files_and_batches_through_the_sdk(stack: Stack) -> None:
    from openai.types import Batch
    from openai.types.chat import ChatCompletion

    def line(custom_id: str, **body) -> bytes:
        request = {"model": "slm_only", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, **body}
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                           "body": request}).encode() + b"\n"

    content = line("one") + line("two", temperature=0.3) + line("bad", model="gpt-4o") + b"{broken\n"
    file = stack.sdk.files.create(file=("questions.jsonl", content), purpose="batch")
    assert file.bytes == len(content) and file.purpose == "batch"
    assert stack.sdk.files.content(file.id).read() == content
    assert file.id in {f.id for f in stack.sdk.files.list()}
    batch = stack.sdk.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"purpose": "test"},
    )
    Batch.model_validate(batch.model_dump())
    assert batch.status == "in_progress" and batch.request_counts.total == 4
    assert batch.metadata == {"purpose": "test"}
    done = stack.until(lambda: stack.sdk.batches.retrieve(batch.id), lambda b: b.status == "completed",
                       240, "the batch")
    Batch.model_validate(done.model_dump())
    assert done.request_counts.completed == 2 and done.request_counts.failed == 2
    outputs = _lines(stack, done.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == ["one", "two"]
    for output in outputs:
        assert output["response"]["status_code"] == 200 and output["error"] is None
        completion = ChatCompletion.model_validate(output["response"]["body"])
        assert stack.job(output["response"]["request_id"])["answer"] == completion.choices[0].message.content
    errors = _lines(stack, done.error_file_id)
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("bad", 404), (None, 400)]
    assert "does not exist" in errors[0]["response"]["body"]["error"]["message"]
    listed = list(stack.sdk.batches.list(limit=2))  # pages through every batch of the key
    assert batch.id in {b.id for b in listed}
    for item in listed:
        if item.model_extra.get("lines") is None:  # an OpenAI batch (native ones keep their shape)
            Batch.model_validate(item.model_dump())
    # Cancel another: it ends cancelled; what it had not run is in its error file.
    many = b"".join(line(f"c{i}", max_tokens=64) for i in range(12))
    second = stack.sdk.batches.create(
        input_file_id=stack.sdk.files.create(file=("many.jsonl", many), purpose="batch").id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    cancelled = stack.sdk.batches.cancel(second.id)
    assert cancelled.status in ("cancelling", "cancelled")
    ended = stack.until(lambda: stack.sdk.batches.retrieve(second.id), lambda b: b.status == "cancelled",
                        240, "the cancel")
    assert ended.request_counts.total == 12
    assert any(e["error"] and e["error"]["code"] == "batch_cancelled" for e in _lines(stack, ended.error_file_id))
    deleted = stack.sdk.files.delete(file.id)
    assert deleted.deleted and deleted.id == file.id
    with pytest.raises(openai.NotFoundError):
        stack.sdk.files.retrieve(file.id)


def test_litellm_completion(stack: Stack) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network lookups
    litellm = pytest.importorskip("litellm")
    response = litellm.completion(
        model="openai/slm_only",
        api_base=f"{stack.base_url}/v1",
        api_key=stack.key,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=6,
    )
    assert isinstance(response.choices[0].message.content, str)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.usage.completion_tokens > 0
