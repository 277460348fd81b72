"""A SIMULATED model server, for capacity measurement only.

This is a stand-in, not a model: it never runs a network and says nothing about any
model's answers or quality. It speaks the part of SGLang's HTTP interface the `sglang`
backend uses (`/v1/completions` with streaming, stop strings, logprobs and echoed prompt
logprobs, `/tokenize`, `/detokenize`, `/health`, `/abort_request`, `/get_model_info`,
`/v1/models`, `/flush_cache`) and takes the time a continuous-batching GPU engine would
take, so that `bench/capacity.py` can drive the control plane at GPU speed on a machine
without a GPU.

The timing model (one engine loop, one asyncio task):
- a decode step of `a + c * b` seconds advances every one of the `b` running sequences by
  one token; at most `capacity` sequences run, later requests wait for a free slot;
- a request admitted to the batch adds `p` seconds per prompt token not in the prefix cache
  to the step it joins (prefill; its first token comes out of that step);
- the prefix cache (like SGLang's radix cache) matches a prompt by its longest cached
  prefix in blocks of 16 tokens; finished sequences (prompt and output) are cached, least
  recently used blocks are evicted beyond `cache_tokens`;
- with `--enable-priority-scheduling` (SGLang's flag), waiting requests are admitted by
  their `priority` field, higher values first (SGLang's default direction), then in
  arrival order; without it the field is ignored, as SGLang ignores it. Pre-emption of
  running requests is not simulated.
Profiles (`--profile`) hold `a`, `c`, `p` and `capacity` derived from published SGLang
figures for one H100/H200 (docs/deploy.md, "Capacity", cites them); each can be overridden.

Text is deterministic: a request's output is drawn from a fixed word list by a generator
seeded with a hash of its prompt (and seed), so the same request always gets the same
answer. Its natural length is drawn from `--natural-tokens MIN:MAX`; a request ends with
finish_reason "stop" (EOS, or a stop string, left out of the text as SGLang does) when
that length is below `max_tokens`, else "length". Tokens are one whitespace-led run of at
most five non-space characters (about 1.2 per English word, near a BPE tokenizer).

CPU: one engine loop per process; per step it touches only streaming requests (one event
each) and the requests that finish (a heap keyed by the step they finish at), so hundreds
of sequences in flight cost little CPU. `GET /sim/stats` reports counters; with `--record`
every completion and tokenize request (time, path, body) is kept for `GET /sim/log` (the
capacity bench replays them).

    python bench/sim_server.py --profile 32b-h200 --port 30000 --model-path org/Model
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import heapq
import itertools
import json
import random
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass(frozen=True)
class Profile:
    """Engine timing: decode step `decode_base_s + decode_per_seq_s * b`, prefill
    `prefill_per_token_s` per uncached prompt token, at most `capacity` sequences."""

    decode_base_s: float
    decode_per_seq_s: float
    prefill_per_token_s: float
    capacity: int
    cache_tokens: int  # prefix-cache size (tokens of KV kept)


# Derivations and sources: docs/deploy.md, "Capacity". bf16 weights, one GPU, SGLang.
PROFILES: dict[str, Profile] = {
    # ~7-8B dense model on one H100 80 GB.
    "7b-h100": Profile(0.007, 0.00015, 0.00005, 256, 900_000),
    # ~7-8B dense model on one H200 141 GB (1.43x H100's memory bandwidth).
    "7b-h200": Profile(0.005, 0.00011, 0.00005, 512, 2_000_000),
    # ~32B dense model on one H200 141 GB.
    "32b-h200": Profile(0.018, 0.00045, 0.00020, 128, 230_000),
    # ~32B dense model on two H100 80 GB, tensor parallel 2.
    "32b-h100x2": Profile(0.014, 0.00040, 0.00012, 128, 300_000),
}

BLOCK = 16  # tokens per prefix-cache block
# Output words: one token each (a space and at most five characters).
WORDS = tuple(
    [
        "the",
        "so",
        "we",
        "add",
        "both",
        "and",
        "then",
        "by",
        "two",
        "each",
        "has",
        "same",
        "size",
        "let",
        "x",
        "be",
        "it",
        "all",
        "sum",
        "is",
        "of",
        "to",
        "find",
        "half",
        "more",
        "less",
        "one",
        "four",
        "five",
        "six",
        "ten",
        "step",
        "next",
        "part",
        "so",
        "far",
        "left",
        "over",
        "must",
        "take",
    ]
)
_TOKEN = re.compile(r"\s*\S{1,5}|\s+")
# Fixed alternatives for logprobs: plausible (they sum below 1), and cheap to serialise.
_TOP = {" the": -0.7, " a": -1.9, " x": -2.6, " 2": -3.2, " is": -3.7, ",": -4.1}


def tokenize(text: str) -> list[str]:
    """One whitespace-led run of up to five non-space characters per token; lossless."""
    return _TOKEN.findall(text)


def _seed(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class PrefixCache:
    """Cached prefixes as chained hashes of 16-token blocks, least recently used evicted."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_blocks = max(1, capacity_tokens // BLOCK)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    @staticmethod
    def _chain(tokens: list[str]) -> list[int]:
        hashes, h = [], 0
        for i in range(0, len(tokens) - len(tokens) % BLOCK, BLOCK):
            h = hash((h, *tokens[i : i + BLOCK]))
            hashes.append(h)
        return hashes

    def match(self, tokens: list[str]) -> int:
        """How many leading tokens are cached (whole blocks)."""
        hit = 0
        for h in self._chain(tokens):
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            hit += BLOCK
        return hit

    def insert(self, tokens: list[str]) -> None:
        for h in self._chain(tokens):
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()


@dataclass(eq=False)
class Sequence:
    rid: str
    prompt_tokens: list[str]
    output: list[str]  # every token it will produce
    finish: str  # finish_reason once all of `output` is out
    stream: asyncio.Queue | None = None  # tokens as they come (streaming requests)
    done: asyncio.Future | None = None
    cached: int = 0
    produced: int = 0
    aborted: bool = False
    admitted_at: float = 0.0
    priority: int = 0


@dataclass
class Stats:
    requests: int = 0
    completed: int = 0
    aborted: int = 0
    steps: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    busy_s: float = 0.0
    max_running: int = 0
    max_waiting: int = 0
    queue_wait_s: float = 0.0  # summed over requests: arrival to admission
    started: float = field(default_factory=time.monotonic)


class Engine:
    """The continuous-batching loop: admits waiting sequences at step boundaries and
    advances all running ones one token per step."""

    def __init__(self, profile: Profile, by_priority: bool = False) -> None:
        self.profile = profile
        self.by_priority = by_priority
        self.cache = PrefixCache(profile.cache_tokens)
        self.running: dict[int, tuple[Sequence, int]] = {}  # id -> (seq, finish step)
        self.streaming: set[Sequence] = set()
        # a heap of (-priority or 0, arrival number, arrival time, seq): admission order
        self.waiting: list[tuple[int, int, float, Sequence]] = []
        self._arrivals = itertools.count()
        self.by_rid: dict[str, Sequence] = {}
        self._finish_heap: list[tuple[int, int]] = []  # (finish step, id)
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self.step_no = 0
        self.stats = Stats()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def submit(self, seq: Sequence) -> None:
        seq.done = asyncio.get_running_loop().create_future()
        self.by_rid[seq.rid] = seq
        rank = -seq.priority if self.by_priority else 0
        heapq.heappush(self.waiting, (rank, next(self._arrivals), time.monotonic(), seq))
        self.stats.requests += 1
        self.stats.max_waiting = max(self.stats.max_waiting, len(self.waiting))
        self._wake.set()

    def abort(self, rid: str) -> bool:
        seq = self.by_rid.get(rid)
        if seq is None or seq.aborted:
            return False
        seq.aborted = True
        self.waiting = [entry for entry in self.waiting if entry[3] is not seq]
        heapq.heapify(self.waiting)
        for key, (running, _) in list(self.running.items()):
            if running is seq:
                del self.running[key]  # its heap entry is dropped when it comes up
        self.streaming.discard(seq)
        self._finish(seq, "abort")
        self.stats.aborted += 1
        return True

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish = reason
        self.by_rid.pop(seq.rid, None)
        if seq.stream is not None:
            seq.stream.put_nowait(None)
        if seq.done is not None and not seq.done.done():
            seq.done.set_result(None)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                deadline = loop.time()
            prefill = self._admit()
            b = len(self.running)
            dt = (
                self.profile.decode_base_s
                + self.profile.decode_per_seq_s * b
                + self.profile.prefill_per_token_s * prefill
            )
            deadline = max(deadline, loop.time() - dt) + dt  # no catch-up bursts
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            self.stats.busy_s += dt
            self.step_no += 1
            self.stats.steps += 1
            self.stats.generated_tokens += b
            for seq in self.streaming:
                seq.stream.put_nowait(seq.output[seq.produced])  # type: ignore[union-attr]
                seq.produced += 1
            while self._finish_heap and self._finish_heap[0][0] <= self.step_no:
                _, key = heapq.heappop(self._finish_heap)
                entry = self.running.pop(key, None)
                if entry is None:
                    continue  # aborted
                seq = entry[0]
                seq.produced = len(seq.output)
                self.streaming.discard(seq)
                self.cache.insert(seq.prompt_tokens + seq.output)
                self.stats.completed += 1
                self._finish(seq, seq.finish)

    def _admit(self) -> int:
        """Move waiting sequences into free slots; the uncached prompt tokens they bring."""
        prefill = 0
        now = time.monotonic()
        while self.waiting and len(self.running) < self.profile.capacity:
            _, _, arrived, seq = heapq.heappop(self.waiting)
            seq.cached = self.cache.match(seq.prompt_tokens)
            prefill += len(seq.prompt_tokens) - seq.cached
            self.stats.prompt_tokens += len(seq.prompt_tokens)
            self.stats.cached_tokens += seq.cached
            self.stats.queue_wait_s += now - arrived
            key = next(self._ids)
            # The step it joins produces its first token: it finishes len(output) steps on.
            finish = self.step_no + max(1, len(seq.output))
            self.running[key] = (seq, finish)
            heapq.heappush(self._finish_heap, (finish, key))
            if seq.stream is not None:
                self.streaming.add(seq)
            seq.admitted_at = now
        self.stats.max_running = max(self.stats.max_running, len(self.running))
        return prefill


class Vocabulary:
    """Token strings to ids and back (grown as new tokens are seen)."""

    def __init__(self, bos: str | None) -> None:
        self.bos = bos
        self.ids: dict[str, int] = {}
        self.tokens: list[str] = []
        if bos is not None:
            self.id(bos)

    def id(self, token: str) -> int:
        found = self.ids.get(token)
        if found is None:
            found = self.ids[token] = len(self.tokens)
            self.tokens.append(token)
        return found


@dataclass(frozen=True)
class Options:
    profile: Profile
    model_path: str
    served_model_name: str
    natural_min: int
    natural_max: int
    add_bos: bool
    record: bool
    priority_scheduling: bool = False


class Problem(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def build_app(options: Options) -> Starlette:
    engine = Engine(options.profile, options.priority_scheduling)
    vocab = Vocabulary("<s>" if options.add_bos else None)
    log: list[dict[str, Any]] = []
    rids = itertools.count()

    def problem(status: int, message: str) -> JSONResponse:
        body = {"object": "error", "message": message, "type": "BadRequestError", "code": status}
        return JSONResponse(body, status_code=status)

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise Problem(400, "request body is not JSON") from None
        if not isinstance(body, dict):
            raise Problem(400, "request body must be a JSON object")
        return body

    def plan(body: dict[str, Any]) -> tuple[Sequence, dict[str, Any]]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise Problem(400, "prompt must be a string (this simulator takes one text prompt)")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise Problem(400, "max_tokens must be positive")
        if int(body.get("n", 1)) != 1:
            raise Problem(400, "n must be 1")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        tokens = ([vocab.bos] if vocab.bos is not None else []) + tokenize(prompt)
        rng = random.Random(_seed(prompt, body.get("seed"), body.get("temperature")))
        natural = rng.randint(options.natural_min, options.natural_max)
        n = min(natural, max_tokens)
        output = [" " + rng.choice(WORDS) for _ in range(n)]
        finish = "stop" if natural < max_tokens else "length"
        rid = str(body.get("rid") or f"sim-{next(rids)}")
        priority = body.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise Problem(400, "priority must be an integer")
        seq = Sequence(rid, tokens, output, finish, priority=priority)
        return seq, {"stop": stop, "logprobs": body.get("logprobs"), "echo": body.get("echo")}

    async def completions(request: Request) -> Response:
        try:
            body = await body_of(request)
            seq, extra = plan(body)
        except Problem as error:
            return problem(error.status, str(error))
        if options.record:
            log.append({"t": time.monotonic(), "path": "/v1/completions", "body": body})
        if body.get("stream"):
            seq.stream = asyncio.Queue()
            engine.submit(seq)
            return StreamingResponse(_events(seq, extra), media_type="text/event-stream")
        engine.submit(seq)
        try:
            await seq.done  # type: ignore[misc]
        except asyncio.CancelledError:
            engine.abort(seq.rid)
            raise
        return Response(_completion_json(seq, extra, body), media_type="application/json")

    async def _events(seq: Sequence, extra: dict[str, Any]):
        top_k = int(extra["logprobs"] or 0)
        try:
            while True:
                token = await seq.stream.get()  # type: ignore[union-attr]
                if token is None:
                    break
                choice: dict[str, Any] = {"index": 0, "text": token, "finish_reason": None}
                if top_k:
                    choice["logprobs"] = _logprobs([token], top_k)
                yield f"data: {json.dumps({'object': 'text_completion', 'choices': [choice]})}\n\n"
            last = {"index": 0, "text": "", "finish_reason": seq.finish}
            yield f"data: {json.dumps({'object': 'text_completion', 'choices': [last]})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if seq.rid in engine.by_rid:  # the client went away: stop generating
                engine.abort(seq.rid)

    def _completion_json(seq: Sequence, extra: dict[str, Any], body: dict[str, Any]) -> bytes:
        text, tokens, finish = "".join(seq.output), list(seq.output), seq.finish
        top_k = int(extra["logprobs"] or 0)
        usage = {
            "prompt_tokens": len(seq.prompt_tokens),
            "completion_tokens": len(tokens),
            "total_tokens": len(seq.prompt_tokens) + len(tokens),
            "prompt_tokens_details": {"cached_tokens": seq.cached},
        }
        head = {"id": seq.rid, "object": "text_completion", "model": options.served_model_name}
        if extra["echo"]:
            text = body["prompt"] + text
            tokens = seq.prompt_tokens + tokens
        choice = {"index": 0, "text": text, "finish_reason": finish, "matched_stop": None}
        if not top_k:
            return json.dumps({**head, "choices": [choice], "usage": usage}).encode()
        # Hand-assembled so that a 1,000-token echo costs little: the top-k alternatives
        # are the same fragment at every position.
        lp = _logprobs_json(tokens, top_k, first_null=bool(extra["echo"]))
        choice_json = json.dumps(choice)[:-1] + f', "logprobs": {lp}}}'
        return (
            json.dumps(head)[:-1] + f', "choices": [{choice_json}], "usage": {json.dumps(usage)}}}'
        ).encode()

    async def tokenize_endpoint(request: Request) -> Response:
        try:
            body = await body_of(request)
        except Problem as error:
            return problem(error.status, str(error))
        text = body.get("prompt", body.get("text", ""))
        if not isinstance(text, str):
            return problem(400, "prompt must be a string")
        if options.record:
            log.append({"t": time.monotonic(), "path": "/tokenize", "body": body})
        ids = [vocab.id(t) for t in tokenize(text)]
        if options.add_bos and body.get("add_special_tokens", True):
            ids.insert(0, 0)
        return JSONResponse({"tokens": ids, "count": len(ids)})

    async def detokenize(request: Request) -> Response:
        try:
            body = await body_of(request)
        except Problem as error:
            return problem(error.status, str(error))
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and 0 <= i < len(vocab.tokens) for i in ids
        ):
            return problem(400, "tokens must be a list of known token ids")
        return JSONResponse({"text": "".join(vocab.tokens[i] for i in ids)})

    async def abort(request: Request) -> Response:
        try:
            body = await body_of(request)
        except Problem as error:
            return problem(error.status, str(error))
        engine.abort(str(body.get("rid", "")))
        return Response(status_code=200)

    async def health(_request: Request) -> Response:
        return Response(status_code=200)

    async def model_info(_request: Request) -> Response:
        return JSONResponse(
            {
                "model_path": options.model_path,
                "tokenizer_path": options.model_path,
                "is_generation": True,
            }
        )

    async def models(_request: Request) -> Response:
        card = {
            "id": options.served_model_name,
            "object": "model",
            "owned_by": "sglang",
            "root": options.model_path,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def flush_cache(_request: Request) -> Response:
        engine.cache.clear()
        return Response("Cache flushed.", status_code=200)

    async def stats(_request: Request) -> Response:
        s = engine.stats
        out = {k: v for k, v in vars(s).items() if k != "started"}
        out |= {
            "uptime_s": time.monotonic() - s.started,
            "running": len(engine.running),
            "waiting": len(engine.waiting),
            "profile": vars(options.profile),
            "logged": len(log),
        }
        return JSONResponse(out)

    async def sim_log(request: Request) -> Response:
        entries = list(log)
        if request.query_params.get("clear"):
            log.clear()
        return JSONResponse(entries)

    async def sim_reset(_request: Request) -> Response:
        engine.stats = Stats()
        return Response(status_code=200)

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/tokenize", tokenize_endpoint, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
            Route("/abort_request", abort, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/health_generate", health, methods=["GET"]),
            Route("/get_model_info", model_info, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/flush_cache", flush_cache, methods=["GET", "POST"]),
            Route("/sim/stats", stats, methods=["GET"]),
            Route("/sim/log", sim_log, methods=["GET"]),
            Route("/sim/reset", sim_reset, methods=["POST"]),
        ],
        lifespan=_lifespan(engine),
    )
    app.state.engine = engine
    return app


def _lifespan(engine: Engine):
    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette):
        engine.start()
        yield

    return lifespan


def _logprob(token: str) -> float:
    return -0.05 - (sum(map(ord, token)) % 23) / 10.0


_TOP_JSON: dict[int, str] = {}


def _top_json(k: int) -> str:
    if k not in _TOP_JSON:
        _TOP_JSON[k] = json.dumps(dict(itertools.islice(_TOP.items(), k)))
    return _TOP_JSON[k]


def _logprobs(tokens: list[str], k: int) -> dict[str, Any]:
    top = dict(itertools.islice(_TOP.items(), k))
    return {
        "tokens": tokens,
        "token_logprobs": [_logprob(t) for t in tokens],
        "top_logprobs": [dict(top, **{t: _logprob(t)}) for t in tokens],
        "text_offset": list(itertools.accumulate([0, *map(len, tokens[:-1])])),
    }


def _logprobs_json(tokens: list[str], k: int, first_null: bool) -> str:
    values = [_logprob(t) for t in tokens]
    tops = [_top_json(k)] * len(tokens)
    if first_null and tokens:  # no distribution before the first prompt token
        values[0] = None  # type: ignore[call-overload]
        tops[0] = "null"
    offsets = list(itertools.accumulate([0, *map(len, tokens[:-1])])) if tokens else []
    return (
        f'{{"tokens": {json.dumps(tokens)}, "token_logprobs": {json.dumps(values)}, '
        f'"top_logprobs": [{", ".join(tops)}], "text_offset": {json.dumps(offsets)}}}'
    )


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    lo, hi = int(low), int(high or low)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError("expected MIN:MAX with 1 <= MIN <= MAX")
    return lo, hi


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="7b-h100")
    parser.add_argument("--decode-base-ms", type=float, help="a: decode step at batch 1")
    parser.add_argument("--decode-per-seq-ms", type=float, help="c: added per running sequence")
    parser.add_argument("--prefill-per-token-ms", type=float, help="p: per uncached prompt token")
    parser.add_argument("--capacity", type=int, help="most sequences decoded together")
    parser.add_argument("--cache-tokens", type=int, help="prefix cache size in tokens")
    parser.add_argument("--model-path", default="sim/model")
    parser.add_argument("--served-model-name", help="default: the model path")
    parser.add_argument("--natural-tokens", type=_range, default=(64, 1024), metavar="MIN:MAX")
    parser.add_argument("--add-bos", action="store_true", help="the tokenizer adds a BOS token")
    parser.add_argument("--record", action="store_true", help="keep request bodies for /sim/log")
    parser.add_argument(
        "--enable-priority-scheduling",
        action="store_true",
        help="admit waiting requests by their priority field, higher first (as SGLang)",
    )
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    profile = PROFILES[args.profile]
    overrides = {
        "decode_base_s": None if args.decode_base_ms is None else args.decode_base_ms / 1000,
        "decode_per_seq_s": None
        if args.decode_per_seq_ms is None
        else args.decode_per_seq_ms / 1000,
        "prefill_per_token_s": None
        if args.prefill_per_token_ms is None
        else args.prefill_per_token_ms / 1000,
        "capacity": args.capacity,
        "cache_tokens": args.cache_tokens,
    }
    profile = replace(profile, **{k: v for k, v in overrides.items() if v is not None})
    if profile.capacity < 1 or min(profile.decode_base_s, profile.decode_per_seq_s) < 0:
        raise SystemExit("sim_server: capacity must be >= 1 and times >= 0")
    return Options(
        profile=profile,
        model_path=args.model_path,
        served_model_name=args.served_model_name or args.model_path,
        natural_min=args.natural_tokens[0],
        natural_max=args.natural_tokens[1],
        add_bos=args.add_bos,
        record=args.record,
        priority_scheduling=args.enable_priority_scheduling,
    )


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    app = build_app(options_from(args))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        loop="asyncio",
        timeout_keep_alive=30,
    )


if __name__ == "__main__":
    main()
