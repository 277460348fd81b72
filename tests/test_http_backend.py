"""OpenAIHTTPBackend against a real llama.cpp OpenAI-compatible server
(`llama-cpp-python[server]`) with the default SmolLM2 model. No fakes."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from services.core.backends.base import (
    Backend,
    BackendError,
    GenerationRequest,
    TransientBackendError,
)
from services.core.backends.chat_template import CHATML_TEMPLATE, render_chat
from services.core.backends.default_model import default_model_path
from services.core.backends.openai_http import SCORE_TOP_K, OpenAIHTTPBackend
from tests.llama_server import LlamaServer, free_port

pytestmark = [pytest.mark.model, pytest.mark.timeout(180)]

PROMPT = "The capital of France is"
SCORE_TEXT = (
    "Photosynthesis is the process by which green plants use sunlight, water and carbon "
    "dioxide to make glucose and oxygen."
)
N_PARAMS = 134_515_008


@pytest.fixture(scope="module")
def server():
    with LlamaServer(n_ctx=4096) as srv:
        yield srv


@pytest.fixture(scope="module")
def backend(server):
    with OpenAIHTTPBackend(server.url, n_params=N_PARAMS, role="executor") as b:
        yield b


@pytest.fixture(scope="module")
def exact():
    """The exact per-position log-probs and entropies, straight from llama.cpp's logits."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(default_model_path()), n_ctx=512, logits_all=True, n_threads=2, verbose=False
    )

    def run(text: str) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
        tokens = llm.tokenize(text.encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        rows = logp[:-1]
        picked = rows[np.arange(len(rows)), tokens[1:]]
        entropy = -(np.exp(rows) * rows).sum(axis=1)
        return tokens, picked, entropy, rows

    yield run
    llm.close()


def req(prompt: str = PROMPT, **kw) -> GenerationRequest:
    kw.setdefault("max_tokens", 8)
    return GenerationRequest(prompt=prompt, **kw)


def test_is_a_backend(backend):
    assert isinstance(backend, Backend)
    assert backend.server_kind == "llama-cpp-python"
    assert backend.model_name.endswith(".gguf")


def test_generate_stop_string_usage_and_finish(backend):
    gen = backend.generate(req(stop=(".",), max_tokens=16))
    assert gen.finish_reason == "stop"
    assert gen.text.strip() == "Paris"
    assert "." not in gen.text
    assert gen.usage.prompt_tokens == backend.count_tokens(PROMPT) == 5
    assert 1 <= gen.usage.generated_tokens <= 16
    assert gen.usage.cached_prompt_tokens == 0  # llama.cpp reports none
    assert gen.latency_s > 0
    assert gen.tokens == ()  # not asked for


def test_generate_max_tokens_gives_length(backend):
    gen = backend.generate(req("Count: 1, 2, 3,", max_tokens=3))
    assert gen.finish_reason == "length"
    assert gen.usage.generated_tokens == 3


def test_generate_top_logprobs(backend):
    gen = backend.generate(req(stop=("\n",), max_tokens=6, top_logprobs=3, request_id="t-lp"))
    assert gen.tokens
    assert "".join(t.text for t in gen.tokens) == gen.text  # the stop token is left out
    for tok in gen.tokens:
        assert tok.logprob <= 0
        assert 3 <= len(tok.top) <= 4  # llama-cpp-python adds the chosen token
        assert tok.entropy is not None and tok.entropy >= 0
        assert tok.logprob == pytest.approx(tok.top[tok.text], abs=1e-6)


def test_greedy_is_deterministic(backend):
    a = backend.generate(req("Once upon a time", max_tokens=12, seed=1))
    b = backend.generate(req("Once upon a time", max_tokens=12, seed=2))
    assert a.text == b.text and a.text


def test_generate_many_concurrently(backend):
    prompts = ["One, two,", "Red, green,", "Monday, Tuesday,", "January, February,"]
    requests = [req(p, max_tokens=4, request_id=f"many-{i}") for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    many = backend.generate_many(requests)
    elapsed = time.perf_counter() - t0
    assert [g.text for g in many] == [backend.generate(r).text for r in requests]
    assert all(g.usage.generated_tokens >= 1 for g in many)
    print(f"\ngenerate_many(4): {elapsed:.2f}s")


def test_stream_matches_generate(backend):
    r = req("Once upon a time", max_tokens=10)
    tokens = list(backend.stream(r))
    assert "".join(t.text for t in tokens) == backend.generate(r).text
    assert all(t.logprob <= 0 and t.entropy is None for t in tokens)


def test_stream_with_top_logprobs_and_stop(backend):
    tokens = list(backend.stream(req(stop=(".",), max_tokens=16, top_logprobs=2)))
    assert "".join(t.text for t in tokens).strip() == "Paris"
    assert all(t.top and t.entropy is not None for t in tokens)


def test_closing_a_stream_is_clean(backend, server):
    it = backend.stream(req("Once upon a time", max_tokens=200))
    first = [next(it), next(it)]
    it.close()  # closes the response and calls abort (a no-op here: no /abort_request)
    assert all(t.text is not None for t in first)
    assert list(it) == []
    # The server is still serving and the next request is not disturbed.
    assert backend.generate(req(stop=(".",), max_tokens=16)).text.strip() == "Paris"
    assert server.running


def test_score_against_exact_llama_cpp(backend, exact):
    tokens, exact_lp, exact_h, rows = exact(SCORE_TEXT)
    t0 = time.perf_counter()
    s = backend.score(SCORE_TEXT)
    elapsed = time.perf_counter() - t0
    n = len(tokens)
    assert s.n_tokens == n == backend.count_tokens(SCORE_TEXT)
    assert len(s.token_logprobs) == len(s.entropies) == n - 1
    assert s.exact is False
    assert s.usage.prompt_tokens == n

    got_lp, got_h = np.asarray(s.token_logprobs), np.asarray(s.entropies)
    # A position's log-prob is exact when the server listed the token among its top-k.
    kth = -np.sort(-rows, axis=1)[:, SCORE_TOP_K - 1]
    in_top = exact_lp >= kth - 1e-6
    lp_err, h_err = np.abs(got_lp - exact_lp), np.abs(got_h - exact_h)
    assert in_top.mean() > 0.8
    assert lp_err[in_top].max() < 2e-3
    assert np.all(got_lp[~in_top] <= kth[~in_top] + 1e-3)  # estimates stay below the top-k
    assert np.all(got_h >= exact_h - 2e-3)  # the uniform tail is an upper bound
    assert h_err.mean() < 0.5
    print(
        f"\nscore over {n} tokens ({elapsed:.2f}s, top-{SCORE_TOP_K}, assumed vocab "
        f"{backend.vocab_size}): logprob MAE in-top-k {lp_err[in_top].mean():.2e}, "
        f"all {lp_err.mean():.3f} ({(~in_top).sum()} of {n - 1} outside top-k); "
        f"entropy MAE {h_err.mean():.3f} nats (max {h_err.max():.3f}, mean exact "
        f"{exact_h.mean():.3f})"
    )


def test_score_truncation_and_known_vocab(server, backend, exact):
    """max_tokens cuts the text; with the true vocabulary size the estimate tightens."""
    _, exact_lp, exact_h, _ = exact(SCORE_TEXT)
    with OpenAIHTTPBackend(server.url, n_params=N_PARAMS, vocab_size=49152) as b:
        short = b.score(SCORE_TEXT, max_tokens=10)
    assert short.n_tokens == 10
    assert len(short.token_logprobs) == len(short.entropies) == 9
    lp_err = np.abs(np.asarray(short.token_logprobs) - exact_lp[:9])
    assert np.sum(lp_err > 2e-3) <= 2  # only tokens outside the top-k are estimated
    h_err = np.abs(np.asarray(short.entropies) - exact_h[:9])
    assert np.all(np.asarray(short.entropies) >= exact_h[:9] - 2e-3)
    print(f"\nentropy MAE, first 9 positions, true vocab size 49152: {h_err.mean():.3f} nats")


def test_score_tiny_texts(backend):
    assert backend.score("").n_tokens == 0
    one = backend.score("Hello")
    assert one.n_tokens == 1 and one.token_logprobs == () and one.entropies == ()
    two = backend.score("Hello world")
    assert two.n_tokens == 2 and len(two.token_logprobs) == 1
    assert all(math.isfinite(v) for v in two.token_logprobs + two.entropies)


def test_unreachable_server_is_transient_and_fast():
    url = f"http://127.0.0.1:{free_port()}"
    b = OpenAIHTTPBackend(url, retries=1, connect_timeout_s=1, role="coordinator")
    t0 = time.perf_counter()
    with pytest.raises(TransientBackendError) as err:
        b.generate(req())
    assert time.perf_counter() - t0 < 3
    msg = str(err.value)
    assert url in msg and "TANDEM_COORDINATOR_URL" in msg and "refused" in msg
    assert "\n" not in msg and "Traceback" not in msg
    with pytest.raises(TransientBackendError, match="unreachable"):
        b.health()
    b.close()


def test_client_error_is_not_retried(backend):
    t0 = time.perf_counter()
    with pytest.raises(BackendError) as err:
        backend.generate(req("word " * 5000, max_tokens=4))
    assert not isinstance(err.value, TransientBackendError)
    assert "context length" in str(err.value) and "HTTP 400" in str(err.value)
    assert "\n" not in str(err.value)
    assert time.perf_counter() - t0 < 10


def test_invalid_request_is_rejected_locally(backend):
    with pytest.raises(BackendError, match="top_p"):
        backend.generate(req(top_p=0.0))


def test_chat_prompt_uses_the_served_gguf_template(backend):
    import llama_cpp

    # llama-cpp-python has no /props; the model it reports is the GGUF file, whose own
    # template is used (it is ChatML whenever a system message is given).
    llm = llama_cpp.Llama(str(default_model_path()), n_ctx=64, verbose=False, vocab_only=True)
    gguf_template = llm.metadata["tokenizer.chat_template"]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    got = backend.chat_prompt(messages)
    assert backend.chat_template_origin() == str(default_model_path())
    assert got == render_chat(CHATML_TEMPLATE, messages, add_generation_prompt=True)
    assert got == render_chat(gguf_template, messages, add_generation_prompt=True)
    assert got.endswith("<|im_start|>assistant\n")
    assert not backend.chat_prompt(messages, add_generation_prompt=False).endswith("assistant\n")


def test_chat_prompt_from_constructor_template(server):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with OpenAIHTTPBackend(server.url, chat_template=template) as b:
        assert b.chat_prompt([{"role": "user", "content": "hi"}]) == "[user] hi\n"


def test_n_params_needs_override_for_llama_cpp_python(server, backend):
    assert backend.n_params == N_PARAMS
    with (
        OpenAIHTTPBackend(server.url, role="executor") as b,
        pytest.raises(BackendError, match="TANDEM_EXECUTOR_PARAMS"),
    ):
        _ = b.n_params


def test_health_and_abort(backend):
    backend.health()  # no /health here: falls back to /v1/models
    backend.abort("no-such-request")  # 404 on llama.cpp: ignored
    backend.abort("no-such-request")
