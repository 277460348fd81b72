"""Benchmark the in-process engine (LocalBackend) on the default model.

    .venv/bin/python bench/engine.py [--threads N] [--tokens 128] [--repeats 3]
        [--weights auto|as-is] [--batch 8]

Prints warm load time, single-stream greedy decode speed (median of repeats), 8-way
concurrent aggregate speed (8 different prompts through generate_many) and their ratio.
The machine's load average is printed too: llama.cpp's threads spin, so anything else
running on the cores slows every figure down, often by far more than its share.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core.backends.base import GenerationRequest
from services.core.backends.default_model import default_model_path
from services.core.backends.local import EXACT_STEP_TOKENS, LocalBackend
from services.core.backends.weights import prepare_weights

TOPICS = [
    "the history of the Roman empire",
    "how rivers shape valleys",
    "the life of honey bees",
    "why the sky is blue",
    "the invention of the printing press",
    "how volcanoes form",
    "the rules of chess",
    "the water cycle",
]


def _request(b: LocalBackend, topic: str, tokens: int) -> GenerationRequest:
    prompt = b.chat_prompt([{"role": "user", "content": f"Write a long essay about {topic}."}])
    return GenerationRequest(prompt=prompt, max_tokens=tokens)


def _load_times(path: Path, args: argparse.Namespace) -> list[float]:
    LocalBackend(path, n_threads=args.threads, max_batch=args.batch).close()  # page cache
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        b = LocalBackend(path, n_threads=args.threads, max_batch=args.batch)
        times.append(time.perf_counter() - t0)
        b.close()
    return times


def _single(b: LocalBackend, args: argparse.Namespace) -> list[float]:
    rates = []
    for i in range(args.repeats):
        out = b.generate(_request(b, TOPICS[i % len(TOPICS)], args.tokens))
        rates.append(out.usage.generated_tokens / out.latency_s)
    return rates


def _concurrent(b: LocalBackend, args: argparse.Namespace) -> list[float]:
    rates = []
    for i in range(args.repeats):
        topics = [f"{t} (part {i + 1})" for t in TOPICS[: args.batch]]
        requests = [_request(b, t, args.tokens) for t in topics]
        t0 = time.perf_counter()
        outs = b.generate_many(requests)
        wall = time.perf_counter() - t0
        rates.append(sum(o.usage.generated_tokens for o in outs) / wall)
    return rates


def _fmt(rates: list[float]) -> str:
    runs = ", ".join(f"{r:.1f}" for r in rates)
    return f"{statistics.median(rates):.1f} tok/s median, {max(rates):.1f} best  (runs: {runs})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: all CPUs)")
    ap.add_argument("--tokens", type=int, default=128, help="generated tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="concurrent requests (= max_batch)")
    ap.add_argument("--step-tokens", type=int, default=EXACT_STEP_TOKENS)
    ap.add_argument("--model", type=Path, default=None, help="a GGUF file (default: packaged)")
    ap.add_argument(
        "--weights", choices=["auto", "q8_0", "as-is"], default="auto", help="TANDEM_LOCAL_WEIGHTS"
    )
    args = ap.parse_args()
    path = prepare_weights(args.model or default_model_path(), args.weights)
    load_before = os.getloadavg()[0]
    load = _load_times(path, args)
    with LocalBackend(
        path, n_threads=args.threads, max_batch=args.batch, step_tokens=args.step_tokens
    ) as b:
        b.generate(_request(b, "warming up", 8))
        single = _single(b, args)
        agg = _concurrent(b, args)
    print(
        f"model {path.name}  threads {b.n_threads}  cpus {os.cpu_count()}  "
        f"step_tokens {args.step_tokens}  "
        f"loadavg(1m) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}"
    )
    ratio = statistics.median(agg) / statistics.median(single)
    rows = [
        ("warm load (median of 3)", f"{statistics.median(load):.3f} s"),
        (f"single stream, {args.tokens} tok greedy", _fmt(single)),
        (f"{args.batch}-way concurrent aggregate", _fmt(agg)),
        ("concurrent / single (medians)", f"{ratio:.2f}x"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
