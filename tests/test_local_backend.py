"""LocalBackend against the real default model (SmolLM2-135M-Instruct, CPU)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.core.backends import local as local_mod
from services.core.backends.base import (
    Backend,
    BackendError,
    GenerationRequest,
    ModelLoadError,
    Priority,
)
from services.core.backends.chat_template import CHATML_TEMPLATE, render_chat
from services.core.backends.default_model import default_model_path
from services.core.backends.local import LocalBackend

pytestmark = pytest.mark.model

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
]


@pytest.fixture(scope="module")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def backend(model_path: Path) -> Iterator[LocalBackend]:
    # One llama.cpp thread: its threads spin, and on a shared 2-core box two of them make
    # every step many times slower whenever anything else runs.
    b = LocalBackend(model_path, max_batch=4, n_ctx=2048, n_threads=1)
    yield b
    b.close()


def chat(b: LocalBackend, question: str) -> str:
    return b.chat_prompt([{"role": "user", "content": question}])


def req(prompt: str, max_tokens: int = 24, **kw: object) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


def wait_until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_protocol_and_metadata(backend: LocalBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.model_name == "SmolLM2-135M-Instruct.Q4_1"
    assert 100e6 < backend.n_params < 200e6
    assert backend.count_tokens("Hello world") >= 2
    backend.health()


def test_chat_prompt_is_chatml(backend: LocalBackend) -> None:
    prompt = backend.chat_prompt([{"role": "user", "content": "Hi there"}])
    assert "<|im_start|>user\nHi there<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    plain = render_chat(None, [{"role": "user", "content": "x"}], add_generation_prompt=False)
    assert plain == "<|im_start|>user\nx<|im_end|>\n"
    assert render_chat(CHATML_TEMPLATE, [{"role": "user", "content": "x"}]).endswith("assistant\n")


def test_greedy_is_deterministic_and_batch_invariant(backend: LocalBackend) -> None:
    requests = [req(chat(backend, q), max_tokens=24) for q in QUESTIONS]
    alone = [backend.generate(r) for r in requests]
    again = backend.generate(requests[0])
    assert again.text == alone[0].text
    batched = backend.generate_many(requests)
    # Decode steps stay under 64 tokens, where llama.cpp's CPU results do not depend on the
    # batch: outputs are identical, not just close (see EXACT_STEP_TOKENS).
    for a, b in zip(alone, batched, strict=True):
        assert a.text == b.text
        assert a.usage.generated_tokens == b.usage.generated_tokens


def test_max_tokens_exact(backend: LocalBackend) -> None:
    out = backend.generate(req("Count from one to one hundred: one, two, three,", max_tokens=7))
    assert out.finish_reason == "length"
    assert out.usage.generated_tokens == 7
    assert out.usage.prompt_tokens == backend.count_tokens(
        "Count from one to one hundred: one, two, three,"
    )


def test_zero_max_tokens(backend: LocalBackend) -> None:
    out = backend.generate(req("Hello", max_tokens=0))
    assert (out.text, out.finish_reason, out.usage.generated_tokens) == ("", "length", 0)


def test_stop_strings_excluded(backend: LocalBackend) -> None:
    prompt = chat(backend, QUESTIONS[3])
    full = backend.generate(req(prompt, max_tokens=32)).text
    words = full.split()
    assert len(words) > 4, full
    stop = words[3]
    out = backend.generate(req(prompt, max_tokens=32, stop=("zzzz-never", stop)))
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]
    assert stop not in out.text
    streamed = backend.stream(req(prompt, max_tokens=32, stop=(stop,)))
    assert "".join(t.text for t in streamed) == out.text  # held back, never sent then cut


def test_top_logprobs(backend: LocalBackend) -> None:
    out = backend.generate(req(chat(backend, QUESTIONS[0]), max_tokens=8, top_logprobs=5))
    assert len(out.tokens) == out.usage.generated_tokens or out.finish_reason == "stop"
    assert "".join(t.text for t in out.tokens) == out.text
    for tok in out.tokens:
        assert len(tok.top) <= 5 and tok.top
        assert tok.logprob <= 0.0 and tok.entropy is not None and tok.entropy >= 0.0
        # greedy: the chosen token is the most likely one
        assert tok.logprob == pytest.approx(max(tok.top.values()), abs=1e-6)


def test_prefix_cache(backend: LocalBackend) -> None:
    prompt = chat(backend, "Tell me a short story about a robot who learns to paint.")
    first = backend.generate(req(prompt, max_tokens=16))
    second = backend.generate(req(prompt + first.text + " Then", max_tokens=4))
    n_first = backend.count_tokens(prompt)
    assert second.usage.cached_prompt_tokens >= n_first - 1
    assert second.usage.prompt_tokens > n_first
    again = backend.generate(req(prompt, max_tokens=16))
    assert again.text == first.text
    assert again.usage.cached_prompt_tokens == again.usage.prompt_tokens - 1


def test_score_matches_reference(backend: LocalBackend, model_path: Path) -> None:
    from tests.infra import reference_logits

    text = "Question: what is 17 * 23?\n\nHint: 17 * 20 = 340 and 17 * 3 = 51. " * 8
    text += "\n\nAnswer:"
    got = backend.score(text)
    tokens, logits = reference_logits(model_path, text)  # with the engine's own kernels
    assert got.n_tokens == len(tokens) > 2 * 128  # crosses scoring chunks
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    want_lp = logp[np.arange(len(tokens) - 1), tokens[1:]]
    want_h = -(np.exp(logp) * logp).sum(axis=1)[:-1]
    assert got.exact
    np.testing.assert_allclose(got.token_logprobs, want_lp, atol=1e-3)
    np.testing.assert_allclose(got.entropies, want_h, atol=1e-3)
    short = backend.score(text, max_tokens=50)
    assert short.n_tokens == 50 and len(short.token_logprobs) == 49
    np.testing.assert_allclose(short.token_logprobs, want_lp[:49], atol=1e-3)


def test_score_equals_generation_logprobs(backend: LocalBackend) -> None:
    prompt = chat(backend, QUESTIONS[3])
    out = backend.generate(req(prompt, max_tokens=20, top_logprobs=1))
    n = backend.count_tokens(prompt)
    if backend.count_tokens(prompt + out.text) != n + len(out.tokens):
        pytest.skip("the generated text re-tokenizes differently")
    got = backend.score(prompt + out.text)
    assert list(got.token_logprobs[n - 1 :]) == [t.logprob for t in out.tokens]
    assert list(got.entropies[n - 1 :]) == [t.entropy for t in out.tokens]


def test_stream_matches_generate_and_close_frees_slot(backend: LocalBackend) -> None:
    r = req(chat(backend, QUESTIONS[2]), max_tokens=20)
    streamed = list(backend.stream(r))
    assert "".join(t.text for t in streamed) == backend.generate(r).text
    long = req(chat(backend, "Write a very long essay about rivers."), max_tokens=2000)
    streams = [backend.stream(long) for _ in range(backend.max_batch)]  # fills every slot
    for s in streams:
        next(s)
    for s in streams:
        s.close()
    wait_until(lambda: not backend._active())
    out = backend.generate(req(chat(backend, QUESTIONS[0]), max_tokens=4))
    assert out.usage.generated_tokens == 4


def test_dropping_a_stream_aborts_it(backend: LocalBackend) -> None:
    long = req(chat(backend, "Write a very long essay about mountains."), max_tokens=2000)
    for tok in backend.stream(long):
        assert tok.text is not None
        break
    wait_until(lambda: not backend._active())


def test_abort_by_request_id(backend: LocalBackend) -> None:
    results = []
    r = req(
        chat(backend, "Write a very long essay about forests."), max_tokens=2000, request_id="ab"
    )
    worker = threading.Thread(target=lambda: results.append(backend.generate(r)))
    worker.start()
    wait_until(lambda: any(s.n_generated > 2 for s in backend._active()))
    backend.abort("ab")
    backend.abort("unknown-id")  # no-op
    worker.join(10)
    (out,) = results
    assert out.finish_reason == "abort"
    assert 0 < out.usage.generated_tokens < 2000


@pytest.mark.parametrize("cap", [1, 2])
def test_batch_sequences_share_an_interactive_requests_steps_up_to_the_cap(
    backend: LocalBackend, monkeypatch, cap: int  # type: ignore[no-untyped-def]
) -> None:
    """Three batch sequences decode; an interactive request arrives. While it runs, every
    step carries at most `cap` tokens, its own token among them; batch sequences take the
    rest in turn (cap 1: they wait), and its output is what it is alone."""
    question = req(chat(backend, QUESTIONS[3]), max_tokens=16)
    alone = backend.generate(question)
    monkeypatch.setattr(backend, "interactive_step_tokens", cap)
    workers = []
    for i, topic in enumerate(["deserts", "rivers", "bees"]):
        essay = req(
            chat(backend, f"Write a very long essay about {topic}."),
            max_tokens=2000,
            request_id=f"batch-{i}",
            priority=Priority.BATCH,
        )
        workers.append(threading.Thread(target=backend.generate, args=(essay,)))
        workers[-1].start()
    wait_until(lambda: sum(s.n_generated > 2 for s in backend._active()) == 3)
    batch_ids = [s.slot.seq_id for s in backend._active()]
    steps: list[tuple[list[int], int]] = []  # while it runs: each step's seq ids, its own
    real_decode = backend._llama.decode

    def decode(tokens, pos, seq, out):  # type: ignore[no-untyped-def]
        (own,) = [s.slot.seq_id for s in backend._active() if not s.request.priority] or [-1]
        if own >= 0:
            steps.append((seq.tolist(), own))
        return real_decode(tokens, pos, seq, out)

    monkeypatch.setattr(backend._llama, "decode", decode)
    beside = backend.generate(question)
    for i in range(3):
        backend.abort(f"batch-{i}")
    for worker in workers:
        worker.join(10)
    assert beside.text == alone.text and beside.usage.generated_tokens == 16
    for ids, own in steps:
        mine = ids.count(own)
        assert mine >= 1 and len(ids) - mine <= max(0, cap - mine), (ids, own)
    fed = [sum(ids.count(b) for ids, _ in steps) for b in batch_ids]
    decoding = sum(ids.count(own) == 1 for ids, own in steps)  # its 1-token steps
    assert decoding >= 15
    # cap 1: the batch ones wait; cap 2: one batch token per decoding step, in turn
    assert sum(fed) == (cap - 1) * decoding, (fed, decoding)
    assert max(fed) - min(fed) <= 1, fed
    wait_until(lambda: not backend._active())


def test_the_step_cap_setting_matches_the_engine() -> None:
    from services.settings import Settings

    field = Settings.model_fields["local_interactive_step_tokens"]
    assert field.default == local_mod.INTERACTIVE_STEP_TOKENS
    assert max(m.le for m in field.metadata if hasattr(m, "le")) == local_mod.EXACT_STEP_TOKENS


def test_interactive_requests_take_free_slots_first(model_path: Path) -> None:
    one = LocalBackend(model_path, max_batch=1, n_ctx=1024, n_threads=1)
    try:
        occupant = req(chat(one, "Write a very long essay about lakes."), max_tokens=2000)
        stream = one.stream(occupant)  # holds the only slot
        next(stream)
        finished: list[str] = []

        def run(name: str, priority: Priority) -> None:
            one.generate(req(chat(one, QUESTIONS[0]), max_tokens=4, priority=priority))
            finished.append(name)

        threads = [threading.Thread(target=run, args=("batch", Priority.BATCH))]
        threads[0].start()
        wait_until(lambda: len(one._waiting) == 1)
        threads.append(threading.Thread(target=run, args=("interactive", Priority.INTERACTIVE)))
        threads[1].start()
        wait_until(lambda: len(one._waiting) == 2)
        stream.close()  # frees the slot: the later, interactive request takes it
        for thread in threads:
            thread.join(20)
        assert finished == ["interactive", "batch"]
    finally:
        one.close()


def test_many_threads_and_a_failing_request(backend: LocalBackend, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real_sample = local_mod._sample

    def sample(logits, temperature, top_p, rng):  # type: ignore[no-untyped-def]
        if temperature == 0.5:
            raise RuntimeError("boom")
        return real_sample(logits, temperature, top_p, rng)

    monkeypatch.setattr(local_mod, "_sample", sample)
    outcomes: dict[int, object] = {}

    def work(i: int) -> None:
        try:
            if i % 4 == 3:
                outcomes[i] = backend.score(f"Sentence number {i} is here.").n_tokens
            else:
                temp = 0.5 if i == 5 else 0.8
                r = req(chat(backend, QUESTIONS[i % 4]), max_tokens=8, temperature=temp, seed=i)
                outcomes[i] = backend.generate(r).usage.generated_tokens
        except BackendError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(outcomes.pop(5), BackendError)
    assert len(outcomes) == 9 and all(isinstance(v, int) and v > 0 for v in outcomes.values())
    backend.health()


def test_seeded_sampling_is_reproducible(backend: LocalBackend) -> None:
    r = req(chat(backend, QUESTIONS[2]), max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    assert backend.generate(r).text == backend.generate(r).text


def test_invalid_request(backend: LocalBackend) -> None:
    with pytest.raises(BackendError, match="top_p"):
        backend.generate(req("x", top_p=0.0))
    backend.health()


def test_context_limit(model_path: Path) -> None:
    with LocalBackend(model_path, max_batch=2, n_ctx=256, n_threads=1) as small:
        assert small.n_ctx == 256
        prompt = "Count from one to one thousand: one, two, three,"
        out = small.generate(req(prompt, max_tokens=1000))
        assert out.finish_reason == "length"
        assert out.usage.prompt_tokens + out.usage.generated_tokens == small.n_ctx
        with pytest.raises(BackendError, match="context"):
            small.generate(req("word " * 300))
        small.health()


def test_load_time_and_close(model_path: Path) -> None:
    b = LocalBackend(model_path, max_batch=1, n_ctx=512, n_threads=1, name="tiny")
    assert b.load_s < 2.0  # the file is in the page cache by now
    assert b.model_name == "tiny"
    b.close()
    b.close()  # idempotent
    with pytest.raises(BackendError):
        b.health()
    with pytest.raises(BackendError):
        b.generate(req("Hello"))


def test_close_fails_inflight_requests(model_path: Path) -> None:
    b = LocalBackend(model_path, max_batch=1, n_ctx=1024, n_threads=1)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            b.generate(req("Write a very long essay about the moon.", max_tokens=900))
        except BackendError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]  # one runs, one queues
    for t in threads:
        t.start()
    wait_until(lambda: any(s.n_generated > 0 for s in b._active()))
    b.close()
    for t in threads:
        t.join(10)
    assert len(errors) == 2 and all("closed" in str(e) for e in errors)


def test_missing_file() -> None:
    with pytest.raises(ModelLoadError, match=r"no-such\.gguf.*no such file.*GGUF"):
        LocalBackend("/nonexistent/no-such.gguf")


@pytest.mark.parametrize("payload", [b"junk" * 1000, b"GGUF" + b"\x07" * 4000])
def test_corrupt_file(tmp_path: Path, payload: bytes) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(payload)
    with pytest.raises(ModelLoadError) as info:
        LocalBackend(bad)
    msg = str(info.value)
    assert str(bad) in msg and "GGUF" in msg and "\n" not in msg
