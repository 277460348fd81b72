"""Engine priority on the in-process engine: what an interactive request costs batch work
beside it, and what batch work costs it, for each `interactive_step_tokens` (issue 16).

    .venv/bin/python bench/priority.py [--batch 8] [--tokens 32] [--repeats 5]
        [--step-tokens 1,2,4,8,16,63] [--threads 1]

`--batch` batch requests (long essays, Priority.BATCH) keep decoding; meanwhile one
interactive request of `--tokens` tokens runs at a time, `--repeats` times, for each cap.
Prints per cap: the interactive latency p50 and its ratio to the same request alone, and
the batch tokens/s made while it ran, as a share of the batch rate with no interactive
request. Cap 1 is "batch waits"; cap 63 (EXACT_STEP_TOKENS) is "no priority in the step".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core.backends.base import GenerationRequest, Priority
from services.core.backends.default_model import default_model_path
from services.core.backends.local import EXACT_STEP_TOKENS, LocalBackend
from services.core.backends.weights import prepare_weights

QUESTION = "Explain step by step how to add 348 and 279."
TOPICS = ["rivers", "deserts", "bees", "volcanoes", "chess", "forests", "lakes", "stars"]


def interactive(engine: LocalBackend, tokens: int) -> GenerationRequest:
    prompt = engine.chat_prompt([{"role": "user", "content": QUESTION}])
    return GenerationRequest(prompt=prompt, max_tokens=tokens)


class BatchLoad:
    """`n` batch-priority sequences decoding essays, each restarted when it ends; counts
    the tokens they make."""

    def __init__(self, engine: LocalBackend, n: int) -> None:
        self.engine, self.tokens, self.stop = engine, 0, threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)
        ]
        for thread in self.threads:
            thread.start()
        while len(self.engine._active()) < n:
            time.sleep(0.01)

    def _run(self, i: int) -> None:
        prompt = self.engine.chat_prompt(
            [{"role": "user", "content": f"Write a very long essay about {TOPICS[i % 8]}."}]
        )
        request = GenerationRequest(prompt=prompt, max_tokens=2000, priority=Priority.BATCH)
        while not self.stop.is_set():
            stream = self.engine.stream(request)
            for _ in stream:
                self.tokens += 1  # one writer per thread; += on an int is atomic enough here
                if self.stop.is_set():
                    stream.close()
                    break

    def rate(self, seconds: float = 3.0) -> float:
        before, t0 = self.tokens, time.perf_counter()
        time.sleep(seconds)
        return (self.tokens - before) / (time.perf_counter() - t0)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-tokens", default=f"1,2,4,8,16,{EXACT_STEP_TOKENS}")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    caps = [int(cap) for cap in args.step_tokens.split(",")]
    path = prepare_weights(default_model_path(), "auto", None)
    engine = LocalBackend(path, n_threads=args.threads, max_batch=args.batch + 1)
    try:
        request = interactive(engine, args.tokens)
        engine.generate(request)  # warm: the prompt is cached from here on
        alone = statistics.median(engine.generate(request).latency_s for _ in range(args.repeats))
        print(f"interactive alone: {args.tokens} tokens in {alone * 1000:.0f} ms (p50)")
        load = BatchLoad(engine, args.batch)
        rate = load.rate()
        print(f"batch alone: {args.batch} sequences, {rate:.1f} tokens/s\n")
        print("cap  interactive p50  ratio  batch tok/s beside  share of alone")
        for cap in caps:
            engine.interactive_step_tokens = cap
            latencies, made, spent = [], 0, 0.0
            for _ in range(args.repeats):
                before, t0 = load.tokens, time.perf_counter()
                latencies.append(engine.generate(request).latency_s)
                made += load.tokens - before
                spent += time.perf_counter() - t0
            p50 = statistics.median(latencies)
            print(
                f"{cap:>3}  {p50 * 1000:>11.0f} ms  {p50 / alone:>5.2f}  "
                f"{made / spent:>18.1f}  {made / spent / rate:>14.2f}"
            )
        load.close()
    finally:
        engine.close()


if __name__ == "__main__":
    main()
