"""Scoring-only engine on torch/transformers, for the classifier worker's feature model.

Exact features: one forward pass, logits -> log-softmax -> for each position the actual
next token's log-probability and the entropy of the full distribution. On CUDA when it
is available, else CPU. Concurrent `score` calls (the worker's threads) are gathered into
right-padded batches by one thread: with causal attention a real token never attends to
the padding after it, so every text's values are those of scoring it alone (up to float
rounding of batched matmuls).

Selected with TANDEM_FEATURE_BACKEND=torch and TANDEM_FEATURE_MODEL = a Hugging Face model
directory or id, or a GGUF file (de-quantized by transformers on load, which needs the
`gguf` and `accelerate` packages); "default" is the packaged SmolLM2 GGUF. It cannot
generate: coordinator and executor roles stay on the local or sglang backends.

Needs `torch` and `transformers` (not main dependencies: the `torch` extra).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any

from services.core.backends.base import (
    BackendError,
    ConfigurationError,
    Generation,
    GenerationRequest,
    ModelLoadError,
    Scoring,
    TokenInfo,
    Usage,
)

_SCORING_ONLY = (
    "the torch backend only scores text (classifier features); use it for the feature model "
    "(TANDEM_FEATURE_BACKEND=torch) and the local or sglang backend for generation"
)


@dataclass
class _Job:
    tokens: list[int]
    t0: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    result: Scoring | None = None
    error: BaseException | None = None


class TorchScoringBackend:
    """A `Backend` whose only capability is exact `score`."""

    def __init__(
        self,
        model: str | Path,
        *,
        device: str | None = None,
        dtype: str = "float32",
        max_batch: int = 16,
        max_batch_tokens: int = 16384,
        name: str | None = None,
    ) -> None:
        try:
            import torch
            import transformers
        except ImportError as error:
            raise ModelLoadError(
                f"the torch backend needs torch and transformers ({error.name} is missing): "
                "pip install 'tandem[torch]'"
            ) from None
        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        self._tokenizer, self._model = _load(transformers, torch, model, self.device, dtype)
        self.load_s = time.perf_counter() - t0
        self.model_name = name or _model_label(model)
        self._n_params = sum(p.numel() for p in self._model.parameters())
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self._queue: SimpleQueue[_Job | None] = SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="torch-scoring", daemon=True)
        self._thread.start()

    # ---- metadata

    @property
    def n_params(self) -> int:
        return self._n_params

    def chat_prompt(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        try:
            return self._tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as error:  # no template, or a template error
            raise BackendError(f"{self.model_name}: cannot apply chat template: {error}") from None

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text))

    def health(self) -> None:
        if self._closed or not self._thread.is_alive():
            raise BackendError(f"torch backend {self.model_name} is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._model = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    # ---- generation: not supported

    def generate(self, request: GenerationRequest) -> Generation:
        raise BackendError(_SCORING_ONLY)

    def generate_many(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        raise BackendError(_SCORING_ONLY)

    def stream(self, request: GenerationRequest) -> Iterator[TokenInfo]:
        raise BackendError(_SCORING_ONLY)

    def abort(self, request_id: str) -> None:
        return None

    # ---- scoring

    def score(self, text: str, max_tokens: int = 1024) -> Scoring:
        if self._closed:
            raise BackendError(f"torch backend {self.model_name} is closed")
        job = _Job(self._tokenize(text)[: max(0, max_tokens)])
        if len(job.tokens) < 2:
            return _result(job, [], [])
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise BackendError(f"torch scoring failed: {job.error}") from job.error
        assert job.result is not None
        return job.result

    def _tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=True)["input_ids"])

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except Empty:
                    break
                if job is None:
                    self._queue.put(None)  # close after this batch
                    break
                batch.append(job)
            for group in _by_tokens(batch, self.max_batch_tokens):
                self._score_batch(group)

    def _score_batch(self, jobs: list[_Job]) -> None:
        torch = self._torch
        try:
            width = max(len(j.tokens) for j in jobs)
            ids = torch.zeros((len(jobs), width), dtype=torch.long)
            mask = torch.zeros((len(jobs), width), dtype=torch.long)
            for row, job in enumerate(jobs):
                ids[row, : len(job.tokens)] = torch.tensor(job.tokens)
                mask[row, : len(job.tokens)] = 1
            with torch.inference_mode():
                logits = self._model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).logits
                for row, job in enumerate(jobs):
                    n = len(job.tokens)
                    logp = torch.log_softmax(logits[row, : n - 1].float(), dim=-1)
                    nxt = ids[row, 1:n].to(self.device)
                    picked = logp.gather(1, nxt[:, None])[:, 0]
                    entropy = -(logp.exp() * logp).sum(-1)
                    job.result = _result(job, picked.tolist(), entropy.tolist())
        except Exception as error:  # fail the requests, keep serving
            for job in jobs:
                job.error = error
        finally:
            for job in jobs:
                job.done.set()


def _result(job: _Job, logprobs: list[float], entropies: list[float]) -> Scoring:
    return Scoring(
        token_logprobs=tuple(logprobs),
        entropies=tuple(entropies),
        n_tokens=len(job.tokens),
        exact=True,
        usage=Usage(prompt_tokens=len(job.tokens)),
        latency_s=time.perf_counter() - job.t0,
    )


def _by_tokens(jobs: list[_Job], max_tokens: int) -> Iterator[list[_Job]]:
    """Split a batch so that padded size (rows x longest) stays under max_tokens."""
    group: list[_Job] = []
    for job in sorted(jobs, key=lambda j: len(j.tokens)):
        width = max(len(job.tokens), *(len(j.tokens) for j in group)) if group else len(job.tokens)
        if group and width * (len(group) + 1) > max_tokens:
            yield group
            group = []
        group.append(job)
    if group:
        yield group


def _model_label(model: str | Path) -> str:
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name or str(model)


def _load(transformers: Any, torch: Any, model: str | Path, device: str, dtype: str) -> Any:
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ModelLoadError(f"unknown torch dtype {dtype!r} (float32, bfloat16, float16)")
    path = Path(model).expanduser()
    kwargs: dict[str, Any] = {}
    source: str | Path = model
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {path}")
        source, kwargs = path.parent, {"gguf_file": path.name}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
        net = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except Exception as error:  # missing files, unknown architecture, no gguf package...
        raise ModelLoadError(
            f"transformers could not load {model}: {type(error).__name__}: {error}"
        ) from None
    return tokenizer, net.to(device).eval()


def load_feature_backend(model: Any) -> TorchScoringBackend:
    """The backend for a role's `ModelSettings` with backend "torch" (the classifier's
    feature model only)."""
    if model.role != "classifier":
        raise ConfigurationError(
            f"the {model.role} model cannot use the torch backend: {_SCORING_ONLY}"
        )
    if model.model == "default":
        from services.core.backends.default_model import default_model_path

        return TorchScoringBackend(default_model_path(), name="SmolLM2-135M-Instruct")
    return TorchScoringBackend(model.model)
