"""Run steps on models and turn what happened into stage records with their cost."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from services.core.backends.base import Generation, GenerationRequest, Priority, TokenInfo
from services.core.cost import generation_tflops, prefill_tflops
from services.core.engines import Engines
from services.core.params import JobParams
from services.core.prompts import classifier_text
from services.core.steps import Generate, Judge, StageRecord, Step
from services.core.sufficiency import SCORING_MAX_TOKENS, features_from_scoring


def execute(
    seq: int,
    step: Step,
    engines: Engines,
    params: JobParams,
    attempt: int = 1,
    request_id: str | None = None,
    priority: Priority = Priority.INTERACTIVE,
) -> StageRecord:
    if isinstance(step, Judge):
        return _judge(seq, step, engines, params, attempt)
    backend = engines.backend(step.role)
    request = _request(step, backend, request_id, priority)
    if step.stop_entropy is not None:
        return _until_uncertain(seq, step, request, step.stop_entropy, engines, attempt)
    generation = backend.generate(request)
    return _generation_record(seq, step, generation, engines, attempt)


def execute_group(
    steps: Sequence[tuple[int, Step]], engines: Engines, params: JobParams
) -> list[StageRecord]:
    """Run a parallel group at once, so an engine can batch it."""
    if len(steps) == 1:
        seq, step = steps[0]
        return [execute(seq, step, engines, params)]
    with ThreadPoolExecutor(max_workers=len(steps)) as pool:
        futures = [pool.submit(execute, seq, step, engines, params) for seq, step in steps]
        return [future.result() for future in futures]


def _request(
    step: Generate, backend, request_id: str | None, priority: Priority
) -> GenerationRequest:
    if step.raw_prompt is not None:
        prompt = step.raw_prompt
    else:
        prompt = backend.chat_prompt(step.messages) + step.continuation
    return GenerationRequest(
        prompt=prompt,
        max_tokens=step.max_tokens,
        stop=step.stop,
        temperature=step.temperature,
        top_p=step.top_p,
        seed=step.seed,
        top_logprobs=step.top_logprobs,
        request_id=request_id,
        priority=priority,
    )


def _generation_record(
    seq: int, step: Generate, generation: Generation, engines: Engines, attempt: int
) -> StageRecord:
    usage = generation.usage
    n_params = engines.n_params(step.role)
    output: dict = {"text": generation.text, "finish_reason": generation.finish_reason}
    if step.top_logprobs:
        output["tokens"] = [
            {"text": t.text, "logprob": t.logprob, "entropy": t.entropy, "top": t.top}
            for t in generation.tokens
        ]
    return StageRecord(
        seq=seq,
        kind=step.kind,
        role=step.role,
        model=engines.backend(step.role).model_name,
        prompt_tokens=usage.prompt_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
        generated_tokens=usage.generated_tokens,
        tflops=generation_tflops(n_params, usage.generated_tokens),
        prefill_tflops=prefill_tflops(n_params, usage.prompt_tokens, usage.cached_prompt_tokens),
        latency_s=generation.latency_s,
        note=step.note,
        output=output,
        attempt=attempt,
    )


def _until_uncertain(
    seq: int,
    step: Generate,
    request: GenerationRequest,
    threshold: float,
    engines: Engines,
    attempt: int,
) -> StageRecord:
    """Stream a generation and stop before the first token drawn from a distribution whose
    entropy exceeds `threshold`; that token is dropped (finish_reason "entropy").

    Cost: every token the model sampled counts, the dropped one included (its forward pass
    ran). Streams report no usage, so prompt tokens are counted with the tokenizer and
    none are reported as cached. An end-of-sequence token is not yielded, so not counted.
    """
    backend = engines.backend(step.role)
    t0 = time.perf_counter()
    kept: list[TokenInfo] = []
    trigger: TokenInfo | None = None
    stream = backend.stream(request)
    try:
        for token in stream:
            if token.entropy is not None and token.entropy > threshold:
                trigger = token
                break
            kept.append(token)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # aborts the rest of the request
    latency = time.perf_counter() - t0
    if trigger is not None:
        finish = "entropy"
    else:
        finish = "length" if len(kept) >= step.max_tokens else "stop"
    output: dict = {
        "text": "".join(token.text for token in kept),
        "finish_reason": finish,
        "kept_tokens": len(kept),
    }
    if trigger is not None:
        output["trigger"] = {
            "entropy": round(float(trigger.entropy or 0.0), 6),
            "threshold": threshold,
            "dropped_token": trigger.text,
        }
    generated = len(kept) + (1 if trigger is not None else 0)
    prompt_tokens = backend.count_tokens(request.prompt)
    n_params = engines.n_params(step.role)
    return StageRecord(
        seq=seq,
        kind=step.kind,
        role=step.role,
        model=backend.model_name,
        prompt_tokens=prompt_tokens,
        generated_tokens=generated,
        tflops=generation_tflops(n_params, generated),
        prefill_tflops=prefill_tflops(n_params, prompt_tokens, 0),
        latency_s=latency,
        note=step.note,
        output=output,
        attempt=attempt,
    )


def _judge(seq: int, step: Judge, engines: Engines, params: JobParams, attempt: int) -> StageRecord:
    backend = engines.backend("classifier")
    scoring = backend.score(classifier_text(step.question, step.hint), SCORING_MAX_TOKENS)
    features = features_from_scoring(scoring, step.stage_index, step.budget)
    policy = engines.policy(params.policy)
    verdict = policy.judge(features, step.stage_index, params.cost_preference)
    usage = scoring.usage
    return StageRecord(
        seq=seq,
        kind=step.kind,
        role="classifier",
        model=backend.model_name,
        prompt_tokens=usage.prompt_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
        # The scoring pass generates nothing: the paper's metric leaves it out, and its
        # forward pass is counted as prefill.
        prefill_tflops=prefill_tflops(
            engines.n_params("classifier"), usage.prompt_tokens, usage.cached_prompt_tokens
        ),
        latency_s=scoring.latency_s,
        note=step.note,
        output={
            "probability": round(verdict.probability, 6),
            "threshold": verdict.threshold,
            "sufficient": verdict.sufficient,
            "policy": verdict.policy,
            "features_exact": scoring.exact,
            "features": [round(x, 6) for x in features],
        },
        attempt=attempt,
    )
