"""The local engine's Q8_0 copy of the packaged Q4_1 model (services/core/backends/weights)."""

from __future__ import annotations

import logging
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from services.core.backends import local as local_mod
from services.core.backends.base import GenerationRequest
from services.core.backends.local import LocalBackend
from services.core.backends.weights import gguf_file_type, prepare_weights
from services.core.engines import Engines
from services.settings import Settings

pytestmark = pytest.mark.model

Q4_1, Q8_0 = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1, llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
PROMPT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May?"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def copy(model_path: Path, cache: Path) -> Path:
    return prepare_weights(model_path, "auto", cache)


def test_auto_makes_one_cached_q8_0_copy(model_path: Path, cache: Path, copy: Path) -> None:
    assert gguf_file_type(model_path) == Q4_1
    assert copy.parent == cache and gguf_file_type(copy) == Q8_0
    made = copy.stat().st_mtime_ns
    assert prepare_weights(model_path, "auto", cache) == copy
    assert copy.stat().st_mtime_ns == made  # reused, not rewritten
    assert not [p for p in cache.iterdir() if p.suffix == ".partial" or ".partial" in p.name]
    assert prepare_weights(copy, "q8_0", cache) == copy  # already Q8_0: kept
    assert prepare_weights(model_path, "as-is", cache) == model_path


def test_unwritable_cache_falls_back_to_the_file(
    model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING):
        assert prepare_weights(model_path, "auto", blocked / "models") == model_path
    assert "could not write its Q8_0 copy" in caplog.text


def test_not_a_gguf_is_left_to_the_loader(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    assert prepare_weights(bad, "auto", tmp_path) == bad


def _log_probs(path: Path) -> np.ndarray:
    llama = local_mod._Llama(path, 1, 512, 1, 63)
    try:
        tokens = llama.tokenize(PROMPT)
        n = len(tokens)
        rc = llama.decode(
            np.array(tokens, np.int32),
            np.arange(n, dtype=np.int32),
            np.zeros(n, np.int32),
            np.ones(n, np.int8),
        )
        assert rc == 0
        return local_mod._log_softmax(llama.logits(0, n).copy())
    finally:
        llama.free()


def test_copy_is_close_to_the_packaged_model(model_path: Path, copy: Path) -> None:
    packaged, reencoded = _log_probs(model_path), _log_probs(copy)
    kl = (np.exp(packaged) * (packaged - reencoded)).sum(axis=-1)
    # Measured 0.006 nats mean; re-quantizing to 4 bits (Q4_0) instead gives 0.33.
    assert kl.mean() < 0.02 and kl.max() < 0.1
    assert (packaged.argmax(-1) == reencoded.argmax(-1)).mean() > 0.9


def test_copy_keeps_greedy_outputs_independent_of_batching(copy: Path) -> None:
    with LocalBackend(copy, max_batch=4, n_ctx=1024, n_threads=1) as backend:
        questions = [PROMPT, "What is 7 times 8?", "Name a prime above 10.", "Spell 'cat'."]
        requests = [
            GenerationRequest(
                prompt=backend.chat_prompt([{"role": "user", "content": q}]), max_tokens=24
            )
            for q in questions
        ]
        alone = [backend.generate(r).text for r in requests]
        batched = [g.text for g in backend.generate_many(requests)]
    assert alone == batched


def test_engines_load_the_copy_under_the_model_name(cache: Path, copy: Path) -> None:
    settings = Settings(
        local_max_batch=2, local_context=1024, local_threads=1, model_cache=str(cache)
    )
    engines = Engines(settings)
    try:
        backend = engines.backend("executor")
        assert isinstance(backend, LocalBackend)
        assert backend.model_path == copy
        assert backend.model_name == "SmolLM2-135M-Instruct"
    finally:
        engines.close()
    as_is = Engines(settings.model_copy(update={"local_weights": "as-is"}))
    try:
        assert as_is.backend("executor").model_path.suffix == ".gguf"  # type: ignore[attr-defined]
        assert as_is.backend("executor").model_path.parent != cache  # type: ignore[attr-defined]
    finally:
        as_is.close()
