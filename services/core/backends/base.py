"""The one small interface every inference engine implements.

Everything above this module (strategies, classifier features, cost accounting) speaks
only these types, so the embedded engine, an SGLang server and a llama.cpp server are
interchangeable. Prompts are raw text: the chat template is applied on our side
(`Backend.chat_prompt`), so every engine sees exactly the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "abort"]


class Priority(IntEnum):
    """Which requests an engine serves first when it holds more than one (lower first)."""

    INTERACTIVE = 0  # someone waits for it: a single job, a chat completion
    BATCH = 1  # offline work, a batch's lines: served while nothing interactive runs


class BackendError(RuntimeError):
    """A model engine failed in a way the caller should report, not retry."""


class TransientBackendError(BackendError):
    """A model engine failed in a way worth retrying (connection refused, 5xx, timeout)."""


class ModelLoadError(BackendError):
    """A model file is missing, unreadable or not a model."""


class ConfigurationError(BackendError):
    """The settings name something that cannot be used; the message says how to fix it.

    Here, beside the other errors a job can end with, so that every layer (engines, the
    classifier's artifact checks, backends, workers) raises and catches the same type
    without importing each other."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    # Top-k alternatives to return per generated token (0: none). Needed by SCoT's
    # selection (restricted next-token choice) and relay's entropy trigger.
    top_logprobs: int = 0
    request_id: str | None = None
    priority: Priority = Priority.INTERACTIVE


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0


@dataclass(frozen=True)
class TokenInfo:
    """One generated token: its text, log-probability, and the distribution around it."""

    text: str
    logprob: float
    # Entropy of the full next-token distribution (nats) when the engine exposes it,
    # else an estimate from the top-k alternatives (see `entropy_from_top_k`).
    entropy: float | None = None
    top: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: FinishReason
    usage: Usage
    latency_s: float
    tokens: tuple[TokenInfo, ...] = ()  # filled when request.top_logprobs > 0


@dataclass(frozen=True)
class Scoring:
    """Teacher-forced pass over a text: for each position t >= 1, the log-probability of
    token t given tokens < t, and the entropy of that next-token distribution."""

    token_logprobs: tuple[float, ...]
    entropies: tuple[float, ...]
    n_tokens: int
    exact: bool  # False when entropies are estimated from top-k logprobs (HTTP engines)
    usage: Usage
    latency_s: float


@runtime_checkable
class Backend(Protocol):
    """An inference engine holding one model."""

    model_name: str

    @property
    def n_params(self) -> int:
        """Parameter count, for the cost model."""
        ...

    def chat_prompt(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Apply the model's chat template to messages, returning raw prompt text."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def generate(self, request: GenerationRequest) -> Generation: ...

    def generate_many(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Run requests concurrently (batched by the engine where it can)."""
        ...

    def stream(self, request: GenerationRequest) -> Iterator[TokenInfo]:
        """Yield tokens as they are generated; closing the iterator aborts the request."""
        ...

    def score(self, text: str, max_tokens: int = 1024) -> Scoring:
        """Score `text` (truncated to its first `max_tokens` tokens)."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop an in-flight request; a no-op if it is unknown or finished."""
        ...

    def health(self) -> None:
        """Raise a BackendError if the engine cannot serve."""
        ...

    def close(self) -> None: ...


def validate_request(request: GenerationRequest) -> None:
    """Reject a request no engine could serve, naming every problem."""
    problems = []
    if request.max_tokens < 0:
        problems.append("max_tokens must be >= 0")
    if not request.temperature >= 0.0:
        problems.append("temperature must be >= 0")
    if not 0.0 < request.top_p <= 1.0:
        problems.append("top_p must be in (0, 1]")
    if request.top_logprobs < 0:
        problems.append("top_logprobs must be >= 0")
    if any(not s for s in request.stop):
        problems.append("stop strings must be non-empty")
    if problems:
        raise BackendError("invalid request: " + "; ".join(problems))


def entropy_from_top_k(top_logprobs: Sequence[float], vocab_size: int) -> float:
    """Estimate the entropy of a distribution seen only through its top-k log-probabilities.

    The k known tokens contribute exactly; the remaining mass r = 1 - sum(p_i) is assumed
    spread uniformly over the other (vocab_size - k) tokens, which contributes
    -r * log(r / (vocab_size - k)). This is an upper bound on the tail's true contribution
    (uniform maximises entropy), so the estimate errs high when the tail is peaked.
    """
    import math

    probs = [math.exp(lp) for lp in top_logprobs]
    head = -sum(p * lp for p, lp in zip(probs, top_logprobs, strict=True) if p > 0)
    rest = max(0.0, 1.0 - sum(probs))
    others = max(1, vocab_size - len(probs))
    tail = -rest * math.log(rest / others) if rest > 1e-12 else 0.0
    return head + tail
