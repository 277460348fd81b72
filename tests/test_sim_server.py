"""bench/sim_server.py, the simulated SGLang server of the capacity benchmark: its protocol
(as our `sglang` backend speaks it), its timing model, its prefix cache, and its CPU cost."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from services.core.backends.base import BackendError, GenerationRequest, Priority
from services.core.backends.openai_http import OpenAIHTTPBackend
from tests.llama_server import SimServer

pytestmark = pytest.mark.timeout(120)

# Slow, round numbers: a step of 20 ms + 2 ms per running sequence, 0.1 ms per prompt token.
TIMING = ["--decode-base-ms", "20", "--decode-per-seq-ms", "2", "--prefill-per-token-ms", "0.1"]


def stats(sim: SimServer) -> dict:
    return httpx.get(f"{sim.url}/sim/stats").json()


def reset(sim: SimServer) -> None:
    httpx.post(f"{sim.url}/sim/reset")
    httpx.post(f"{sim.url}/flush_cache")


@pytest.fixture(scope="module")
def sim():
    with SimServer(
        *TIMING, "--capacity", "4", "--natural-tokens", "30:60", "--model-path", "org/Sim"
    ) as server:
        yield server


@pytest.fixture
def backend(sim):
    reset(sim)
    with OpenAIHTTPBackend(
        sim.url, n_params=7_000_000_000, chat_template="x", role="executor"
    ) as b:
        yield b


def test_speaks_sglang(sim, backend) -> None:
    assert backend.server_kind == "sglang"
    assert backend.model_name == "org/Sim"
    assert httpx.get(f"{sim.url}/get_model_info").json()["model_path"] == "org/Sim"
    backend.health()
    backend.abort("nothing-running")


def test_generation_is_deterministic_with_finish_reasons_and_usage(backend) -> None:
    prompt = "Question: what is two plus two? Answer:"
    capped = backend.generate(GenerationRequest(prompt=prompt, max_tokens=10))
    assert capped.finish_reason == "length" and capped.usage.generated_tokens == 10
    assert capped.usage.prompt_tokens == backend.count_tokens(prompt)
    again = backend.generate(GenerationRequest(prompt=prompt, max_tokens=10))
    assert again.text == capped.text
    other = backend.generate(GenerationRequest(prompt=prompt, max_tokens=10, seed=7))
    assert other.text != capped.text
    free = backend.generate(GenerationRequest(prompt=prompt, max_tokens=500, stop=("</think>",)))
    assert free.finish_reason == "stop" and 30 <= free.usage.generated_tokens <= 60
    assert free.text.startswith(capped.text)  # the same draw, not cut at 10
    with_lp = backend.generate(GenerationRequest(prompt=prompt, max_tokens=5, top_logprobs=3))
    assert len(with_lp.tokens) == 5 and all(t.entropy and t.entropy > 0 for t in with_lp.tokens)


def test_scoring_and_tokenizer(backend) -> None:
    text = "Question: what is two plus two?\n\nHint: add them.\n\nAnswer:"
    n = backend.count_tokens(text)
    scoring = backend.score(text, 1024)
    assert scoring.n_tokens == n and len(scoring.entropies) == n - 1
    assert all(0 < e < 20 for e in scoring.entropies) and not scoring.exact
    short = backend.score(text, 5)  # truncated with /tokenize and /detokenize
    assert short.n_tokens == 5


def test_scoring_a_short_text_skips_the_tokenizer() -> None:
    """A text of fewer bytes than the token cap cannot exceed it: one request, not two."""
    with (
        SimServer("--record") as sim,
        OpenAIHTTPBackend(sim.url, n_params=1, chat_template="x") as backend,
    ):
        backend.score("Question: 2+2?\n\nAnswer:", 1024)
        short = httpx.get(f"{sim.url}/sim/log", params={"clear": 1}).json()
        backend.score("word " * 300, 1024)
        long = httpx.get(f"{sim.url}/sim/log").json()
    assert [e["path"] for e in short] == ["/v1/completions"]
    assert [e["path"] for e in long] == ["/tokenize", "/v1/completions"]


def test_streams_and_aborts(sim, backend) -> None:
    tokens = list(backend.stream(GenerationRequest(prompt="go", max_tokens=6, top_logprobs=2)))
    assert len(tokens) == 6 and all(t.top for t in tokens)
    stream = backend.stream(GenerationRequest(prompt="go on", max_tokens=400))
    next(stream)
    stream.close()  # closes the response and aborts the request
    time.sleep(0.3)
    assert stats(sim)["running"] == 0


def test_bad_requests_are_400_with_a_message(sim, backend) -> None:
    response = httpx.post(f"{sim.url}/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert response.status_code == 400 and "max_tokens" in response.json()["message"]
    response = httpx.post(f"{sim.url}/v1/completions", content=b"{not json")
    assert response.status_code == 400
    with pytest.raises(BackendError, match="prompt must be a string"):
        backend._send_json("POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": 2})


def test_decode_steps_follow_the_model(sim, backend) -> None:
    """One request of n tokens: n steps of a + c*1, plus its prefill in the first."""
    prompt = "word " * 40
    started = time.perf_counter()
    gen = backend.generate(GenerationRequest(prompt=prompt, max_tokens=20))
    wall = time.perf_counter() - started
    s = stats(sim)
    model = 20 * (0.020 + 0.002) + gen.usage.prompt_tokens * 0.0001
    assert s["steps"] == 20 and s["busy_s"] == pytest.approx(model, rel=1e-6)
    assert model * 0.95 <= wall <= model * 3  # never faster than the model


def test_capacity_queues_the_rest(sim, backend) -> None:
    """8 requests, 4 slots: two waves of 4, each 10 steps of a + 4c."""
    requests = [GenerationRequest(prompt=f"q{i}", max_tokens=10) for i in range(8)]
    started = time.perf_counter()
    backend.generate_many(requests)
    wall = time.perf_counter() - started
    s = stats(sim)
    assert s["max_running"] == 4 and s["steps"] >= 20 and s["queue_wait_s"] > 0
    assert wall >= 2 * 10 * (0.020 + 4 * 0.002) * 0.95


@pytest.mark.parametrize("by_priority", [True, False])
def test_the_backend_sends_sglang_its_priority(by_priority: bool) -> None:
    """One slot, taken; a batch request, then an interactive one, wait for it. A server
    scheduling by priority (SGLang's --enable-priority-scheduling, here the simulator's)
    admits the interactive one first; without the flag, arrival order."""
    flag = ["--enable-priority-scheduling"] if by_priority else []
    with (
        SimServer(*TIMING, "--capacity", "1", "--record", *flag) as sim,
        OpenAIHTTPBackend(sim.url, n_params=1, chat_template="x") as backend,
    ):
        finished: list[str] = []

        def run(name: str, max_tokens: int, priority: Priority) -> threading.Thread:
            request = GenerationRequest(prompt=name, max_tokens=max_tokens, priority=priority)
            thread = threading.Thread(
                target=lambda: (backend.generate(request), finished.append(name))
            )
            thread.start()
            return thread

        def until(waiting: int, running: int = 1) -> None:
            deadline = time.monotonic() + 10
            while (stats(sim)["waiting"], stats(sim)["running"]) != (waiting, running):
                assert time.monotonic() < deadline, stats(sim)
                time.sleep(0.01)

        threads = [run("occupant", 40, Priority.BATCH)]
        until(waiting=0)
        threads.append(run("batch", 2, Priority.BATCH))
        until(waiting=1)
        threads.append(run("interactive", 2, Priority.INTERACTIVE))
        until(waiting=2)
        for thread in threads:
            thread.join(20)
        sent = {
            e["body"]["prompt"]: e["body"]["priority"]
            for e in httpx.get(f"{sim.url}/sim/log").json()
        }
    assert sent == {"occupant": 0, "batch": 0, "interactive": 100}
    expected = ["interactive", "batch"] if by_priority else ["batch", "interactive"]
    assert finished == ["occupant", *expected]


def test_prefix_cache(backend) -> None:
    prompt = "a fairly long shared prefix of words " * 10
    first = backend.generate(GenerationRequest(prompt=prompt, max_tokens=4))
    assert first.usage.cached_prompt_tokens == 0
    again = backend.generate(GenerationRequest(prompt=prompt + first.text + " more", max_tokens=4))
    cached = again.usage.cached_prompt_tokens
    assert cached > 0 and cached % 16 == 0 and cached >= first.usage.prompt_tokens - 16


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_hundreds_of_sequences_cost_little_cpu() -> None:
    with SimServer("--profile", "7b-h100", "--natural-tokens", "500:500") as sim:
        pid = sim._proc.pid  # type: ignore[union-attr]
        before = _cpu_s(pid)
        with httpx.Client(
            base_url=sim.url, timeout=60, limits=httpx.Limits(max_connections=256)
        ) as client:

            def one(i: int) -> int:
                body = {"prompt": f"request {i} " * 20, "max_tokens": 200}
                return client.post("/v1/completions", json=body).json()["usage"][
                    "completion_tokens"
                ]

            started = time.perf_counter()
            with ThreadPoolExecutor(256) as pool:
                assert sum(pool.map(one, range(256))) == 256 * 200
            wall = time.perf_counter() - started
        cpu = _cpu_s(pid) - before
        s = stats(sim)
    assert s["max_running"] == 256 and s["steps"] >= 200
    # 200 steps of a 256-wide batch (51,200 tokens): the engine loop does not touch every
    # sequence every step, so the CPU is the HTTP handling of 256 requests.
    assert cpu < 0.5 * wall, (cpu, wall)
    assert cpu / 256 < 0.01, f"{cpu / 256 * 1000:.1f} ms CPU per request"
