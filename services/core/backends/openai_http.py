"""Client of an OpenAI-compatible completion server: SGLang in production, llama.cpp's
servers (C++ `llama-server`, `llama-cpp-python[server]`) and vLLM speak the same protocol.

Prompts are raw text (`/v1/completions`); the chat template is applied on our side, with
the served model's own template (`template_source.py` says where it is found; none found
is an error naming `TANDEM_<ROLE>_CHAT_TEMPLATE`, never a guess). When the server adds a
BOS token itself (its tokenizer of an empty text is not empty), a BOS the template writes
is left out of the rendered text, so the model sees one BOS, not two. The server kind
(SGLang, llama.cpp, llama-cpp-python, other) is probed lazily, once, from the endpoints
it answers, and only matters for the extras: tokenization, chat template, model
metadata, abort, and a known flaw of llama-cpp-python's prompt log-probabilities (see
`_realign_llama_cpp_python`).

Errors: connection failures, timeouts, 429 and 5xx are retried `retries` times with
exponential backoff and jitter, then raised as `TransientBackendError`; any other 4xx
is raised at once as `BackendError` carrying the server's own one-line message.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal

import httpx

from services.core.backends.base import (
    BackendError,
    FinishReason,
    Generation,
    GenerationRequest,
    Priority,
    Scoring,
    TokenInfo,
    TransientBackendError,
    Usage,
    entropy_from_top_k,
    validate_request,
)
from services.core.backends.chat_template import ChatTemplateError, render_chat
from services.core.backends.template_source import (
    ChatTemplate,
    ServedModel,
    TemplateSource,
    served_ids,
)
from services.settings import ENV_PREFIX

ServerKind = Literal["sglang", "llama.cpp", "llama-cpp-python", "openai"]

# Vocabulary size assumed by the top-k entropy estimate when neither the caller nor the
# server says (typical of current large models; the estimate depends on it only through
# log(V), so a 2x error moves a position's entropy by at most 0.69 x its tail mass).
DEFAULT_VOCAB_SIZE = 128_000
SCORE_TOP_K = 20  # alternatives requested per scored position
_SCORE_TOP_K_FALLBACK = 5  # OpenAI's own cap, for servers that refuse 20
_POOL_SIZE = 256  # HTTP connections and generate_many threads
_BACKOFF_BASE_S = 0.2
_BACKOFF_CAP_S = 5.0
_ABORT_TIMEOUT_S = 5.0
# SGLang's request `priority`, read when the server runs with --enable-priority-scheduling
# (higher values first, its default direction; a gap over its pre-emption threshold, 10,
# lets an interactive request displace running batch ones when every slot is taken), and
# ignored otherwise. Sent to SGLang only: vLLM refuses a priority unless it was started
# with --scheduling-policy priority, and orders the other way.
SGLANG_PRIORITY = {Priority.INTERACTIVE: 100, Priority.BATCH: 0}
_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "eos": "stop",
    "length": "length",
    "abort": "abort",
}


@dataclass(frozen=True)
class _ServerInfo:
    kind: ServerKind
    model_id: str | None = None
    model_ids: tuple[str, ...] = ()  # what the server says it serves, most specific first
    n_params: int | None = None
    n_vocab: int | None = None
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""


@dataclass(frozen=True)
class _Tokenizer:
    path: str
    text_key: str  # request field holding the text
    special_key: str | None  # request field switching BOS/EOS insertion, if any
    detok_path: str
    detok_text_key: str  # response field holding the decoded text


_TOKENIZERS: dict[ServerKind, _Tokenizer] = {
    "sglang": _Tokenizer("/tokenize", "prompt", "add_special_tokens", "/detokenize", "text"),
    # vLLM: same request shapes as SGLang; its /detokenize answers {"prompt": text}.
    "openai": _Tokenizer("/tokenize", "prompt", "add_special_tokens", "/detokenize", "prompt"),
    "llama.cpp": _Tokenizer("/tokenize", "content", "add_special", "/detokenize", "content"),
    "llama-cpp-python": _Tokenizer("/extras/tokenize", "input", None, "/extras/detokenize", "text"),
}


@dataclass(frozen=True)
class _Rendering:
    template: ChatTemplate
    server_adds_bos: bool


@dataclass
class _Row:
    """What the server told us about one scored position."""

    token: str
    logprob: float | None
    top: dict[str, float] | None


class OpenAIHTTPBackend:
    """One model behind an OpenAI-compatible `/v1/completions` server (SGLang, llama.cpp,
    vLLM). Thread-safe: one pooled `httpx.Client` serves all callers."""

    def __init__(
        self,
        base_url: str,
        *,
        model_name: str | None = None,
        n_params: int | None = None,
        chat_template: str | TemplateSource | None = None,
        timeout_s: float = 300,
        connect_timeout_s: float = 5,
        retries: int = 3,
        vocab_size: int | None = None,
        role: str | None = None,
        score_top_k: int = SCORE_TOP_K,
        api_key: str | None = None,
    ) -> None:
        self._env = ENV_PREFIX.get(role, "TANDEM_<ROLE>") if role else "TANDEM_<ROLE>"
        self.base_url = _normalize_url(base_url, self._env)
        self._model_name = model_name
        self._n_params = n_params
        if isinstance(chat_template, str):
            chat_template = ChatTemplate(chat_template, "the caller")
        self._template_given = chat_template if isinstance(chat_template, ChatTemplate) else None
        self._template_source = (
            chat_template
            if isinstance(chat_template, TemplateSource)
            else TemplateSource(setting=f"{self._env}_CHAT_TEMPLATE")
        )
        self._rendering: _Rendering | None = None
        self._vocab_size = vocab_size
        self._retries = max(0, retries)
        self._score_top_k = max(1, score_top_k)
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=_POOL_SIZE, max_keepalive_connections=_POOL_SIZE),
            trust_env=False,  # model servers are internal endpoints: never via a proxy
            # SGLang's --api-key (TANDEM_MODEL_API_KEY): every endpoint, /health included.
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )
        self._lock = threading.Lock()
        self._info: _ServerInfo | None = None
        self._abort_supported = True
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    # ------------------------------------------------------------------ metadata

    @property
    def model_name(self) -> str:
        if self._model_name is None:
            try:
                self._model_name = self._server().model_id or self.base_url
            except BackendError:
                return self.base_url
        return self._model_name

    @property
    def n_params(self) -> int:
        if self._n_params is None:
            self._n_params = self._server().n_params
        if self._n_params is None:
            raise BackendError(
                f"the model server at {self.base_url} does not report its parameter count; "
                f"set {self._env}_PARAMS (e.g. 7000000000)"
            )
        return self._n_params

    @property
    def vocab_size(self) -> int:
        if self._vocab_size is None:
            self._vocab_size = self._server().n_vocab or DEFAULT_VOCAB_SIZE
        return self._vocab_size

    @property
    def server_kind(self) -> ServerKind:
        return self._server().kind

    def chat_prompt(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render with the served model's own chat template (see `template_source.py`)."""
        rendering = self._template()
        try:
            text = render_chat(
                rendering.template.text,
                messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=rendering.template.bos_token,
                eos_token=rendering.template.eos_token,
            )
        except ChatTemplateError as exc:
            raise BackendError(f"{self.model_name}: {exc}") from exc
        bos = rendering.template.bos_token
        if rendering.server_adds_bos and bos and text.startswith(bos):
            text = text[len(bos) :]
        return text

    def chat_template_origin(self) -> str:
        """Where this model's chat template was found; raises `ChatTemplateNotFound` (a
        configuration error naming the setting) when it cannot be, and
        `TransientBackendError` when the server must be asked and does not answer."""
        return self._template().template.origin

    def _template(self) -> _Rendering:
        with self._lock:
            if self._rendering is not None:
                return self._rendering
        template = self._template_given
        if template is None:
            served = ServedModel()
            if self._template_source.needs_server:
                info = self._server()
                served = ServedModel(
                    info.model_ids, info.chat_template, info.bos_token, info.eos_token
                )
            template = self._template_source.resolve(served, self.base_url)
        rendering = _Rendering(template, template.bos_token != "" and self._adds_bos())
        with self._lock:
            self._rendering = rendering
        return rendering

    def _adds_bos(self) -> bool:
        """Whether the server puts a BOS token before a prompt itself."""
        try:
            return len(self._tokenize("", add_special=True)) > 0
        except _NoTokenizer:
            return False

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text, add_special=True))

    def health(self) -> None:
        """GET /health (SGLang, llama.cpp), else /v1/models; raises TransientBackendError
        naming the URL when the server cannot be reached."""
        resp = self._send("GET", "/health", missing_ok=True, attempts=1)
        if resp is None:
            self._send("GET", "/v1/models", attempts=1)

    # ------------------------------------------------------------------ generation

    def generate(self, request: GenerationRequest) -> Generation:
        validate_request(request)
        t0 = time.perf_counter()
        if request.max_tokens == 0:
            usage = Usage(prompt_tokens=self.count_tokens(request.prompt))
            return Generation("", "length", usage, time.perf_counter() - t0)
        body = self._send_json(
            "POST", "/v1/completions", self._payload(request), request.request_id
        )
        choice = _first_choice(body, self.base_url)
        text = choice.get("text") or ""
        tokens = self._token_infos(choice.get("logprobs"), request.top_logprobs, text)
        return Generation(
            text=text,
            finish_reason=_finish_reason(choice.get("finish_reason")),
            usage=_usage(body.get("usage")),
            latency_s=time.perf_counter() - t0,
            tokens=tokens if request.top_logprobs > 0 else (),
        )

    def generate_many(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Send all requests at once (one thread each, up to 256) so the server batches them."""
        if len(requests) <= 1:
            return [self.generate(r) for r in requests]
        futures = [self._executor().submit(self.generate, r) for r in requests]
        errors = [f.exception() for f in futures]
        for err in errors:
            if err is not None:
                raise err
        return [f.result() for f in futures]

    def stream(self, request: GenerationRequest) -> Iterator[TokenInfo]:
        """Yield tokens as the server sends them. Closing the iterator closes the HTTP
        response and also calls `abort` (SGLang may not abort a dropped stream itself)."""
        validate_request(request)
        if request.request_id is None:
            request = _with_id(request)
        return self._stream(request)

    def _stream(self, request: GenerationRequest) -> Iterator[TokenInfo]:
        payload = self._payload(request) | {"stream": True}
        # Always ask for the chosen token's logprob: TokenInfo carries one.
        payload["logprobs"] = max(1, request.top_logprobs)
        finished = False
        resp = self._open_stream(payload)
        try:
            for chunk in _sse_events(resp, self.base_url):
                if not chunk.get("choices") and not chunk.get("error"):
                    continue  # e.g. a usage-only event
                choice = _first_choice(chunk, self.base_url)
                text = choice.get("text") or ""
                yield from self._token_infos(choice.get("logprobs"), request.top_logprobs, text)
                if choice.get("finish_reason"):
                    finished = True
            finished = True
        except httpx.TransportError as exc:
            raise self._transient(_describe(exc)) from None
        finally:
            resp.close()
            if not finished and request.request_id is not None:
                self.abort(request.request_id)

    def _open_stream(self, payload: dict[str, Any]) -> httpx.Response:
        req = self._client.build_request("POST", "/v1/completions", json=payload)
        return self._with_retries(lambda: self._client.send(req, stream=True), payload.get("rid"))

    # ------------------------------------------------------------------ scoring

    def score(self, text: str, max_tokens: int = 1024) -> Scoring:
        """Teacher-forced log-probabilities and next-token entropies over `text`, truncated
        to its first `max_tokens` tokens.

        Over HTTP the server returns, per prompt position, the chosen token's log-prob
        (exact) and only its top-k alternatives (`echo: true, logprobs: k`; k =
        `score_top_k`, 20 by default, 5 where a server refuses that). Each entropy is estimated from those k log-probs plus
        the chosen token's with `entropy_from_top_k`: known tokens contribute exactly and
        the remaining mass is spread uniformly over the rest of the vocabulary, an upper
        bound on the tail's contribution (so entropies err high where the tail is
        peaked). `exact` is therefore False. One token is generated and discarded
        (SGLang refuses `max_tokens: 0`; llama-cpp-python reads 0 as "no limit").
        """
        t0 = time.perf_counter()
        text = self._truncate(text, max_tokens)
        if not text:
            return _scoring([], [], 0, Usage(), t0)
        body, k = self._echo_logprobs(text)
        rows, n_tokens = self._score_rows(body, text, k)
        rows, n_tokens = rows[: max(0, max_tokens - 1)], min(n_tokens, max_tokens)
        logprobs, entropies = self._row_values(rows)
        usage = _usage(body.get("usage"))
        usage = Usage(
            prompt_tokens=usage.prompt_tokens, cached_prompt_tokens=usage.cached_prompt_tokens
        )
        return _scoring(logprobs, entropies, n_tokens, usage, t0)

    def _echo_logprobs(self, text: str) -> tuple[dict[str, Any], int]:
        payload = {"prompt": text, "max_tokens": 1, "temperature": 0.0, "echo": True}
        k = self._score_top_k
        try:
            return self._send_json("POST", "/v1/completions", payload | {"logprobs": k}), k
        except TransientBackendError:
            raise
        except BackendError as exc:
            if "logprob" not in str(exc).lower():
                raise
        k = _SCORE_TOP_K_FALLBACK
        return self._send_json("POST", "/v1/completions", payload | {"logprobs": k}), k

    def _score_rows(self, body: dict[str, Any], text: str, k: int) -> tuple[list[_Row], int]:
        """Rows for positions 1..n-1 of the n prompt tokens, in OpenAI's convention:
        entry i holds token i, log P(token i | tokens < i) and the top-k at position i."""
        lp = _first_choice(body, self.base_url).get("logprobs") or {}
        tokens, values = lp.get("tokens") or [], lp.get("token_logprobs") or []
        tops = lp.get("top_logprobs") or []
        if not tokens:
            raise BackendError(
                f"the model server at {self.base_url} returned no prompt log-probabilities "
                "(echo + logprobs); llama.cpp's server needs --logits_all true"
            )
        n_prompt = _usage(body.get("usage")).prompt_tokens or len(tokens)
        entries = [_Row(t, v, top) for t, v, top in zip(tokens, values, tops, strict=False)]
        if self._server().kind == "llama-cpp-python":
            return self._realign_llama_cpp_python(entries, lp, text, n_prompt, k)
        entries = entries[:n_prompt]
        rows = entries[1:]
        self._fill_missing(rows, entries, k)
        return rows, len(entries)

    def _realign_llama_cpp_python(
        self, entries: list[_Row], lp: Mapping[str, Any], text: str, n_prompt: int, k: int
    ) -> tuple[list[_Row], int]:
        """llama-cpp-python (<= 0.3.x) fills echo entry i from the logits *after* token i
        (the distribution of token i+1) when the model adds no BOS token, and nulls entry 0.
        So position t's top-k is entry t-1's, the chosen token's log-prob is looked up
        there (estimated when outside the top-k), and position 1 is asked for separately.
        With a BOS token the entries are aligned (BOS itself is not listed)."""
        offsets = lp.get("text_offset") or []
        in_prompt = sum(1 for off in offsets[: len(entries)] if off < len(text))
        if in_prompt < n_prompt:  # BOS present: aligned, entry 0 is position 1
            rows = entries[: n_prompt - 1]
            self._fill_missing(rows, [_Row("", None, None), *rows], k)
            return rows, n_prompt
        prompt = entries[:n_prompt]
        rows = [_Row(prompt[1].token, None, None)] if len(prompt) > 1 else []
        for prev, cur in itertools.pairwise(prompt[1:]):
            rows.append(_Row(cur.token, (prev.top or {}).get(cur.token), prev.top))
        self._fill_missing(rows, prompt, k)
        return rows, n_prompt

    def _fill_missing(self, rows: list[_Row], entries: list[_Row], k: int) -> None:
        """Ask for the distribution after the prefix of any row the echo left empty (a
        plain completion of that prefix reports the next-token top-k)."""
        for i, row in enumerate(rows):
            if row.top is not None:
                continue
            prefix = "".join(e.token for e in entries[: i + 1])
            body = self._send_json(
                "POST",
                "/v1/completions",
                {"prompt": prefix, "max_tokens": 1, "temperature": 0.0, "logprobs": k},
            )
            tops = (_first_choice(body, self.base_url).get("logprobs") or {}).get("top_logprobs")
            row.top = dict(tops[0]) if tops and tops[0] else {}
            if row.logprob is None:
                row.logprob = row.top.get(row.token)

    def _row_values(self, rows: Sequence[_Row]) -> tuple[list[float], list[float]]:
        logprobs, entropies = [], []
        for row in rows:
            top = dict(row.top or {})
            lp = row.logprob if row.logprob is not None else _tail_logprob(top, self.vocab_size)
            top.setdefault(row.token, lp)
            logprobs.append(float(lp))
            entropies.append(entropy_from_top_k(list(top.values()), self.vocab_size))
        return logprobs, entropies

    def _truncate(self, text: str, max_tokens: int) -> str:
        """The prefix of `text` holding about `max_tokens` tokens (the server's tokenizer
        and detokenizer where it has them, else a character-proportional cut)."""
        if max_tokens <= 0 or not text:
            return ""
        if len(text.encode("utf-8")) < max_tokens:
            return text  # every token spans at least one byte: no round trip needed
        try:
            ids = self._tokenize(text, add_special=False)
        except _NoTokenizer:
            return self._truncate_by_chars(text, max_tokens)
        if len(ids) <= max_tokens:
            return text
        head = self._detokenize(ids[:max_tokens])
        return head if text.startswith(head) else text[: len(head)]

    def _truncate_by_chars(self, text: str, max_tokens: int) -> str:
        text = text[: max_tokens * 16]  # no tokenizer averages 16 characters a token
        for _ in range(4):
            body = self._send_json(
                "POST", "/v1/completions", {"prompt": text, "max_tokens": 1, "temperature": 0.0}
            )
            n = _usage(body.get("usage")).prompt_tokens
            if n <= max_tokens:
                return text
            text = text[: max(1, len(text) * max_tokens // n)]
        return text

    # ------------------------------------------------------------------ control

    def abort(self, request_id: str) -> None:
        """POST /abort_request (SGLang); a no-op on servers without it (404)."""
        if not self._abort_supported or self._closed:
            return
        try:
            resp = self._client.post(
                "/abort_request", json={"rid": request_id}, timeout=_ABORT_TIMEOUT_S
            )
        except httpx.HTTPError:
            return  # best effort: the request ends by itself at max_tokens
        if resp.status_code in (404, 405):
            self._abort_supported = False

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def __enter__(self) -> OpenAIHTTPBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _payload(self, request: GenerationRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,  # always: SGLang may not abort dropped requests
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.stop:
            payload["stop"] = list(request.stop)
        if request.seed is not None:
            payload["seed"] = request.seed
        if request.top_logprobs > 0:
            payload["logprobs"] = request.top_logprobs
        if request.request_id is not None:
            payload["rid"] = request.request_id  # SGLang's id, for /abort_request
        if self._server().kind == "sglang":
            payload["priority"] = SGLANG_PRIORITY[request.priority]
        return payload

    def _token_infos(
        self, logprobs: Mapping[str, Any] | None, top_k: int, text: str
    ) -> tuple[TokenInfo, ...]:
        """TokenInfos for the tokens that make up `text` (servers also list the token
        that matched a stop string, which the text leaves out)."""
        if not logprobs:
            return ()
        tokens = logprobs.get("tokens") or []
        values = logprobs.get("token_logprobs") or []
        tops = logprobs.get("top_logprobs") or []
        infos = []
        start = 0
        for i, token in enumerate(tokens):
            if start >= len(text):
                break
            start += len(token)
            lp = values[i] if i < len(values) and values[i] is not None else math.nan
            top = dict(tops[i]) if top_k > 0 and i < len(tops) and tops[i] else {}
            entropy = self._entropy(top, token, lp) if top else None
            infos.append(TokenInfo(text=token, logprob=float(lp), entropy=entropy, top=top))
        return tuple(infos)

    def _entropy(self, top: dict[str, float], token: str, lp: float) -> float:
        known = dict(top)
        if not math.isnan(lp):
            known.setdefault(token, lp)
        return entropy_from_top_k(list(known.values()), self.vocab_size)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_POOL_SIZE, thread_name_prefix="tandem-http")
            return self._pool

    def _server(self) -> _ServerInfo:
        with self._lock:
            if self._info is None:
                self._info = self._probe()
            return self._info

    def _probe(self) -> _ServerInfo:
        models = self._get_optional("/v1/models", soft=False) or {}
        cards = [c for c in models.get("data") or [] if isinstance(c, dict)]
        first = cards[0] if cards else {}
        meta = first.get("meta") or {}
        listed = [v for card in cards for v in (card.get("root"), card.get("id"))]
        common = {
            "model_id": first.get("id"),
            "n_params": _as_int(meta.get("n_params")),
            "n_vocab": _as_int(meta.get("n_vocab")),
        }
        props = self._get_optional("/props")
        if props is not None and (
            "chat_template" in props or "default_generation_settings" in props
        ):
            return _ServerInfo(
                "llama.cpp",
                model_ids=served_ids([props.get("model_path"), *listed]),
                chat_template=props.get("chat_template") or None,
                bos_token=props.get("bos_token") or "",
                eos_token=props.get("eos_token") or "",
                **common,
            )
        info = self._get_optional("/get_model_info") or self._get_optional("/model_info")
        if info is not None and "model_path" in info:
            paths = [info.get("tokenizer_path"), info.get("model_path"), *listed]
            return _ServerInfo("sglang", model_ids=served_ids(paths), **common)
        spec = self._get_optional("/openapi.json") or {}
        if "llama.cpp python" in str((spec.get("info") or {}).get("title", "")).lower():
            return _ServerInfo("llama-cpp-python", model_ids=served_ids(listed), **common)
        return _ServerInfo("openai", model_ids=served_ids(listed), **common)

    def _tokenize(self, text: str, *, add_special: bool) -> list[int]:
        tok = _TOKENIZERS[self._server().kind]
        payload: dict[str, Any] = {tok.text_key: text}
        if tok.special_key:
            payload[tok.special_key] = add_special
        resp = self._send("POST", tok.path, json=payload, missing_ok=True)
        if resp is None:
            raise _NoTokenizer(f"the model server at {self.base_url} has no {tok.path} endpoint")
        tokens = _json(resp, self.base_url).get("tokens")
        if not isinstance(tokens, list):
            raise BackendError(f"unexpected {tok.path} reply from {self.base_url}")
        return [t if isinstance(t, int) else t.get("id", 0) for t in tokens]

    def _detokenize(self, ids: Sequence[int]) -> str:
        tok = _TOKENIZERS[self._server().kind]
        body = self._send_json("POST", tok.detok_path, {"tokens": list(ids)})
        return str(body.get(tok.detok_text_key) or "")

    def _get_optional(self, path: str, soft: bool = True) -> dict[str, Any] | None:
        """GET a JSON object, None if the server lacks the endpoint. With `soft`, a server
        error reads as 'lacks it' too (used once the server is known to be reachable)."""
        resp = self._send("GET", path, missing_ok=True, attempts=1 if soft else None, soft=soft)
        if resp is None:
            return None
        try:
            body = resp.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _send_json(
        self, method: str, path: str, payload: dict[str, Any], rid: str | None = None
    ) -> dict[str, Any]:
        resp = self._send(method, path, json=payload, rid=rid)
        assert resp is not None
        return _json(resp, self.base_url)

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        missing_ok: bool = False,
        attempts: int | None = None,
        rid: str | None = None,
        soft: bool = False,
    ) -> httpx.Response | None:
        """One request with retries. `missing_ok`: a 4xx answer returns None; `soft`: so
        does a failure worth retrying (after the retries)."""

        def call() -> httpx.Response:
            return self._client.request(method, path, json=json)

        try:
            return self._with_retries(call, rid, attempts)
        except _ClientError as exc:
            if missing_ok:
                return None
            raise BackendError(str(exc)) from None
        except TransientBackendError:
            if soft:
                return None
            raise

    def _with_retries(
        self, call: Any, rid: str | None, attempts: int | None = None
    ) -> httpx.Response:
        if self._closed:
            raise BackendError(f"backend for {self.base_url} is closed")
        tries = (self._retries + 1) if attempts is None else max(1, attempts)
        reason = ""
        for attempt in range(tries):
            if attempt:
                time.sleep(_backoff(attempt))
            try:
                resp = call()
            except httpx.UnsupportedProtocol as exc:
                raise BackendError(f"bad model server URL {self.base_url}: {exc}") from None
            except httpx.TransportError as exc:
                reason = _describe(exc)
                if rid is not None and isinstance(exc, httpx.TimeoutException):
                    self.abort(rid)
                continue
            if resp.status_code < 400:
                return resp
            message = _error_message(resp)
            resp.close()
            if resp.status_code == 429 or resp.status_code >= 500:
                reason = f"HTTP {resp.status_code}: {message}"
                continue
            raise _ClientError(
                f"the model server at {self.base_url} rejected the request "
                f"(HTTP {resp.status_code}): {message}"
            )
        raise self._transient(reason)

    def _transient(self, reason: str) -> TransientBackendError:
        return TransientBackendError(
            f"model server at {self.base_url} unreachable: {reason}; check {self._env}_URL "
            "and that the server is running"
        )


class _ClientError(BackendError):
    """A 4xx answer (the caller may read it as 'endpoint missing')."""


class _NoTokenizer(BackendError):
    """The server has no tokenize endpoint."""


# ---------------------------------------------------------------------- pure helpers


def _normalize_url(url: str, env: str) -> str:
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if not url.startswith(("http://", "https://")):
        raise BackendError(
            f"model server URL {url!r} must start with http:// or https:// ({env}_URL)"
        )
    return url


def _with_id(request: GenerationRequest) -> GenerationRequest:
    return replace(request, request_id=f"tandem-{uuid.uuid4().hex}")


def _backoff(attempt: int) -> float:
    return min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (attempt - 1)) * (0.5 + random.random())


def _describe(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer before the timeout"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc)
        return (
            "connection refused"
            if "refused" in text.lower()
            else _one_line(text or "cannot connect")
        )
    return _one_line(str(exc) or type(exc).__name__)


def _one_line(text: str, limit: int = 300) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _error_message(resp: httpx.Response) -> str:
    try:
        resp.read()
        text = resp.text
    except httpx.HTTPError:
        return resp.reason_phrase
    try:
        body: Any = json.loads(text)
    except ValueError:
        return _one_line(text) or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        for candidate in (
            err.get("message") if isinstance(err, dict) else err,
            body.get("message"),
            body.get("detail"),
        ):
            if candidate:
                return _one_line(candidate if isinstance(candidate, str) else json.dumps(candidate))
    return _one_line(json.dumps(body)) or resp.reason_phrase


def _json(resp: httpx.Response, base_url: str) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        raise BackendError(f"the model server at {base_url} sent a non-JSON reply") from None
    if not isinstance(body, dict):
        raise BackendError(f"the model server at {base_url} sent an unexpected reply")
    return body


def _first_choice(body: Mapping[str, Any], base_url: str) -> dict[str, Any]:
    err = body.get("error") or (body if body.get("object") == "error" else None)
    if err:
        message = err.get("message") if isinstance(err, dict) else err
        raise BackendError(f"the model server at {base_url} failed: {_one_line(str(message))}")
    choices = body.get("choices")
    if not choices or not isinstance(choices[0], dict):
        raise BackendError(f"the model server at {base_url} sent a reply without choices")
    return choices[0]


def _sse_events(resp: httpx.Response, base_url: str) -> Iterator[dict[str, Any]]:
    for line in resp.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise BackendError(f"the model server at {base_url} sent a malformed event") from None
        if isinstance(event, dict):
            yield event


def _finish_reason(value: Any) -> FinishReason:
    return _FINISH.get(str(value), "stop")


def _usage(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage()
    details = usage.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        cached_prompt_tokens=int(details.get("cached_tokens") or 0)
        if isinstance(details, dict)
        else 0,
        generated_tokens=int(usage.get("completion_tokens") or 0),
    )


def _as_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _tail_logprob(top: Mapping[str, float], vocab_size: int) -> float:
    """Estimated log-prob of a token outside the known top-k: the leftover mass spread
    uniformly (the same assumption as `entropy_from_top_k`), capped by the smallest known."""
    if not top:
        return -math.log(vocab_size)
    rest = max(1e-12, 1.0 - sum(math.exp(v) for v in top.values()))
    estimate = math.log(rest / max(1, vocab_size - len(top)))
    return min(estimate, min(top.values()))


def _scoring(
    logprobs: Sequence[float], entropies: Sequence[float], n_tokens: int, usage: Usage, t0: float
) -> Scoring:
    return Scoring(
        token_logprobs=tuple(logprobs),
        entropies=tuple(entropies),
        n_tokens=n_tokens,
        exact=False,
        usage=usage,
        latency_s=time.perf_counter() - t0,
    )
