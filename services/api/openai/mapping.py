"""From OpenAI requests to jobs, and from jobs to OpenAI objects. Framework-free: the chat
completions route, OpenAI batch lines and batch output files all go through here, so a
line of a batch is accepted, refused and answered exactly as the same request sent alone.

A conversation becomes the job's question (`conversation_question`); the job runs the
`text` task's prompts (services/core/prompts.py TEXT) unless `tandem.params.task` says
otherwise; `max_tokens` caps the answer. docs/openai.md has the full mapping.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from services.api.openai import catalog
from services.api.openai.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    CompletionTandem,
    CostTotals,
    OpenAIError,
    PromptTokensDetails,
    StageSummary,
    Usage,
)
from services.core.params import MAX_TOKENS_LIMIT, JobParams
from services.core.requests import InvalidRequest, JobRequest, parse_job_request
from services.core.steps import StageRecord
from services.storage.costs import StageSums

MAX_SEED = 2**32 - 9  # JobParams.seed's bound (engines take an unsigned 32-bit seed)
# OpenAI's reasoning effort, read as Tandem's operating point (how much insight to buy).
EFFORT_POINTS = {
    "none": "economy",
    "minimal": "economy",
    "low": "economy",
    "medium": "balanced",
    "high": "quality",
    "xhigh": "quality",
}
# The job parameters that cap the text a strategy answers with.
ANSWER_CAPS = ("executor_max_tokens", "llm_max_tokens", "relay_budget")
REASONING_STRATEGIES = ("tandem",)  # and fixed:N: their coordinator writes insights


@dataclass(frozen=True)
class ChatJob:
    """A chat completion request, as the job it becomes."""

    request: JobRequest
    model: str  # as the request named it
    stream: bool
    include_usage: bool


# --- requests ---------------------------------------------------------------------------


def parse_chat(body: object, max_question_chars: int, *, in_batch: bool = False) -> ChatJob:
    """Validate a chat completion request and map it to a job request; raises OpenAIError
    (400 naming the field, 404 for an unknown model)."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        raise describe(error) from None
    except RecursionError:
        raise OpenAIError(400, "the request is nested too deeply") from None
    choice = catalog.resolve(chat.model)
    _refuse_unsupported(chat, in_batch)
    question = conversation_question(chat.messages)
    params = _params(chat, choice)
    try:
        request = parse_job_request(
            {"question": question, "strategy": choice.strategy, "params": params},
            max_question_chars,
        )
    except InvalidRequest as error:
        message = str(error)
        if message.startswith("question is "):
            raise OpenAIError(
                400,
                message.replace("question is", "the conversation is", 1)
                + " (the messages as one question, see docs/openai.md)",
                param="messages",
                code="context_length_exceeded",
            ) from None
        raise OpenAIError(400, f"tandem.params: {message}", param="tandem.params") from None
    if "\x00" in question:
        raise OpenAIError(400, "messages may not contain NUL characters", param="messages")
    include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
    return ChatJob(request, chat.model, bool(chat.stream), include_usage)


def describe(error: ValidationError) -> OpenAIError:
    """The first problem pydantic found, with OpenAI's `param` path (messages[0].content)."""
    item = error.errors()[0]
    param = _param_path(item["loc"])
    if item["type"] == "extra_forbidden":
        return OpenAIError(
            400,
            f"Unrecognized request argument supplied: {param}",
            param=param,
            code="unknown_parameter",
        )
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] == "missing":
        return OpenAIError(400, f"Missing required parameter: '{param}'.", param=param,
                           code="missing_required_parameter")
    return OpenAIError(400, f"Invalid value for '{param}': {message}", param=param,
                       code="invalid_value")


def _param_path(loc: Sequence[Any]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "list[ContentPart]", "list[str]"):  # pydantic's union branch names
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


def _refuse_unsupported(chat: ChatCompletionRequest, in_batch: bool) -> None:
    def refuse(param: str, message: str) -> None:
        raise OpenAIError(400, message, param=param, code="unsupported_parameter")

    if chat.n not in (None, 1):
        refuse("n", "only n=1 is supported: a job has one answer")
    if chat.stop not in (None, "", []):
        refuse("stop", "stop sequences are not supported: each strategy sets its own stops")
    if chat.tools or chat.functions:
        refuse("tools" if chat.tools else "functions", "tools are not supported: tandem runs no tools")
    for name in ("tool_choice", "function_call"):
        if getattr(chat, name) not in (None, "none", "auto"):
            refuse(name, f"{name} is not supported: tandem runs no tools")
    if chat.logprobs or chat.top_logprobs:
        refuse("logprobs" if chat.logprobs else "top_logprobs", "logprobs are not returned")
    if chat.response_format not in (None, {"type": "text"}):
        refuse("response_format", "only response_format {\"type\": \"text\"} is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(chat, name) not in (None, 0):
            refuse(name, f"{name} is not supported")
    if chat.logit_bias:
        refuse("logit_bias", "logit_bias is not supported")
    if chat.modalities not in (None, ["text"]):
        refuse("modalities", "only the text modality is supported")
    for name in ("audio", "prediction", "web_search_options"):
        if getattr(chat, name) is not None:
            refuse(name, f"{name} is not supported")
    if chat.stream_options is not None and not chat.stream:
        refuse("stream_options", "stream_options are only allowed when stream is true")
    if in_batch and chat.stream:
        refuse("stream", "a batch line cannot stream")
    if chat.temperature is not None and not 0 <= chat.temperature <= 2:
        refuse("temperature", "temperature must be between 0 and 2")
    if chat.top_p is not None and not 0 < chat.top_p <= 1:
        refuse("top_p", "top_p must be greater than 0 and at most 1")
    if chat.seed is not None and not 0 <= chat.seed <= MAX_SEED:
        refuse("seed", f"seed must be between 0 and {MAX_SEED}")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(chat, name)
        if value is not None and not 1 <= value <= MAX_TOKENS_LIMIT:
            refuse(name, f"{name} must be between 1 and {MAX_TOKENS_LIMIT}")
    both = chat.max_tokens, chat.max_completion_tokens
    if None not in both and both[0] != both[1]:
        refuse("max_tokens", "max_tokens and max_completion_tokens differ; send one")
    if chat.reasoning_effort is not None and chat.reasoning_effort not in EFFORT_POINTS:
        refuse("reasoning_effort", f"reasoning_effort must be one of {', '.join(EFFORT_POINTS)}")


def _params(chat: ChatCompletionRequest, choice: catalog.ModelChoice) -> dict[str, Any]:
    """The job's params: `tandem.params` first, the OpenAI fields over them."""
    params: dict[str, Any] = dict(chat.tandem.params) if chat.tandem else {}
    params.setdefault("task", "text")
    for name in ("temperature", "top_p", "seed"):
        if getattr(chat, name) is not None:
            params[name] = getattr(chat, name)
    cap = chat.max_completion_tokens or chat.max_tokens
    if cap is not None:
        params.update(dict.fromkeys(ANSWER_CAPS, cap))
    if choice.cost_preference is not None:
        if chat.reasoning_effort is not None:
            raise OpenAIError(
                400,
                f"the model {chat.model!r} sets the operating point already; drop reasoning_effort",
                param="reasoning_effort",
                code="unsupported_parameter",
            )
        params["cost_preference"] = choice.cost_preference
    elif chat.reasoning_effort is not None:
        params["cost_preference"] = EFFORT_POINTS[chat.reasoning_effort]
    return params


def conversation_question(messages: Sequence[ChatMessage]) -> str:
    """The job's question. A lone user message is the question as it is. Otherwise the
    system and developer messages become instructions, the earlier turns a transcript, and
    the last message (which must be the user's) the one to answer:

        Instructions:
        <system and developer messages>

        Conversation so far:
        User: ...
        Assistant: ...

        Reply to this message:
        <the last user message>
    """
    instructions: list[str] = []
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if message.role in ("tool", "function") or message.tool_calls or message.function_call:
            raise OpenAIError(
                400,
                f"{where}: tool and function messages are not supported (tandem runs no tools)",
                param=f"{where}.role",
                code="unsupported_parameter",
            )
        if message.audio is not None:
            raise OpenAIError(400, f"{where}: audio is not supported", param=f"{where}.audio")
        text = _text(message, where)
        if message.role in ("system", "developer"):
            if text.strip():
                instructions.append(text.strip())
            continue
        speaker = "User" if message.role == "user" else "Assistant"
        if message.name:
            speaker += f" ({message.name})"
        turns.append((speaker, text))
        if message.role == "user" and not text.strip() and index == len(messages) - 1:
            raise OpenAIError(400, f"{where}.content is empty", param=f"{where}.content")
    if not turns or not messages[-1].role == "user":
        raise OpenAIError(
            400,
            "the last message must be the user's: it is the one the job answers",
            param="messages",
        )
    last = turns[-1][1]
    if not instructions and len(turns) == 1:
        return last
    parts = []
    if instructions:
        parts.append("Instructions:\n" + "\n\n".join(instructions))
    if len(turns) > 1:
        parts.append(
            "Conversation so far:\n"
            + "\n\n".join(f"{speaker}: {text.strip()}" for speaker, text in turns[:-1])
        )
    parts.append("Reply to this message:\n" + last.strip())
    return "\n\n".join(parts)


def _text(message: ChatMessage, where: str) -> str:
    content = message.content
    if content is None:
        return message.refusal or ""
    if isinstance(content, str):
        return content
    pieces = []
    for index, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise OpenAIError(
                400,
                f"{where}.content[{index}]: only text content is supported (got {part.type!r})",
                param=f"{where}.content[{index}].type",
                code="unsupported_parameter",
            )
        pieces.append(part.text)
    return "\n".join(pieces)


# --- responses --------------------------------------------------------------------------


def completion_id(job_id: str) -> str:
    return "chatcmpl-" + job_id.removeprefix("job_")


def usage_of(sums: StageSums) -> Usage:
    prompt = int(sums.prompt_tokens)
    generated = int(sums.generated_tokens)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=generated,
        total_tokens=prompt + generated,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=int(sums.cached_prompt_tokens)),
    )


def cost_of(sums: StageSums) -> CostTotals:
    return CostTotals(**sums.to_dict())


def stage_summary(record: StageRecord) -> StageSummary:
    return StageSummary(
        seq=record.seq,
        kind=record.kind,
        role=record.role,
        model=record.model,
        prompt_tokens=record.prompt_tokens,
        cached_prompt_tokens=record.cached_prompt_tokens,
        generated_tokens=record.generated_tokens,
        tflops=record.tflops,
        prefill_tflops=record.prefill_tflops,
        latency_s=record.latency_s,
        finish_reason=record.finish_reason,
    )


def sums_of(records: Sequence[StageRecord]) -> StageSums:
    return StageSums(
        tflops=round(sum(r.tflops for r in records), 9),
        prefill_tflops=round(sum(r.prefill_tflops for r in records), 9),
        prompt_tokens=sum(r.prompt_tokens for r in records),
        cached_prompt_tokens=sum(r.cached_prompt_tokens for r in records),
        generated_tokens=sum(r.generated_tokens for r in records),
    )


def has_insights(strategy: str) -> bool:
    return strategy in REASONING_STRATEGIES or strategy.startswith("fixed:")


def is_insight(strategy: str, record: StageRecord) -> bool:
    """A stage whose text is the coordinator's insights (streamed as reasoning_content)."""
    return has_insights(strategy) and record.kind == "coordinator"


@dataclass(frozen=True)
class FinishedJob:
    """What a chat completion is made of: a succeeded job's fields and its cost."""

    job_id: str
    strategy: str
    params: JobParams
    created_at: datetime
    answer: str | None
    final_text: str | None
    sums: StageSums
    finish_reason: str | None  # the last stage's
    reasoning: str | None = None
    stages: Sequence[StageRecord] | None = None


def content_of(job: FinishedJob) -> str:
    """The assistant's message: the answer for a `text` job (the final text, stripped), the
    final text for math and code jobs (their extracted answer is in `tandem.answer`)."""
    if job.params.task == "text":
        return job.answer or ""
    return (job.final_text or "").strip()


def completion(job: FinishedJob, status_url: str) -> ChatCompletion:
    return ChatCompletion(
        id=completion_id(job.job_id),
        created=int(job.created_at.timestamp()),
        model=catalog.model_of(job.strategy, job.params),
        choices=[
            Choice(
                message=AssistantMessage(content=content_of(job), reasoning_content=job.reasoning),
                finish_reason="length" if job.finish_reason == "length" else "stop",
            )
        ],
        usage=usage_of(job.sums),
        tandem=CompletionTandem(
            job_id=job.job_id,
            status_url=status_url,
            strategy=job.strategy,
            answer=job.answer,
            cost=cost_of(job.sums),
            stages=[stage_summary(r) for r in job.stages] if job.stages is not None else None,
        ),
    )


def from_records(
    job_id: str,
    strategy: str,
    params: JobParams,
    created_at: datetime,
    answer: str | None,
    final_text: str | None,
    records: Sequence[StageRecord],
) -> FinishedJob:
    """A finished job from its stage records (the chat completions route reads them all)."""
    insights = [r.text for r in records if is_insight(strategy, r)]
    return FinishedJob(
        job_id=job_id,
        strategy=strategy,
        params=params,
        created_at=created_at,
        answer=answer,
        final_text=final_text,
        sums=sums_of(records),
        finish_reason=records[-1].finish_reason if records else None,
        reasoning="".join(insights) if insights else None,
        stages=list(records),
    )


# --- batch lines ------------------------------------------------------------------------

LINE_FIELDS = frozenset({"custom_id", "method", "url", "body"})


@dataclass(frozen=True)
class LineRefusal:
    """Why an OpenAI batch line cannot run: the error the same request would get alone."""

    message: str
    param: str | None = None
    code: str | None = None


def parse_batch_line(
    data: dict[str, Any], endpoint: str, max_question_chars: int, max_custom_id: int
) -> tuple[str | None, JobRequest | LineRefusal]:
    """An OpenAI batch line (`custom_id`, `method`, `url`, `body`) as a job request, or why
    not; returns (custom_id or None, request or refusal)."""
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= max_custom_id:
        shown = custom_id[:max_custom_id] if isinstance(custom_id, str) else None
        return shown, LineRefusal(
            f"custom_id must be a string of 1 to {max_custom_id} characters", "custom_id"
        )
    unknown = data.keys() - LINE_FIELDS
    if unknown:
        field = sorted(unknown)[0]
        return custom_id, LineRefusal(
            f"Unrecognized field in a batch line: {field}", field, "unknown_parameter"
        )
    if data.get("method") != "POST":
        return custom_id, LineRefusal("method must be \"POST\"", "method", "invalid_value")
    if data.get("url") != endpoint:
        return custom_id, LineRefusal(
            f"url must be the batch's endpoint {endpoint!r}", "url", "invalid_value"
        )
    if "\x00" in custom_id:
        return custom_id, LineRefusal("custom_id may not contain NUL", "custom_id")
    try:
        chat = parse_chat(data.get("body"), max_question_chars, in_batch=True)
    except OpenAIError as error:
        param = f"body.{error.param}" if error.param else "body"
        return custom_id, LineRefusal(error.message, param, error.code)
    return custom_id, chat.request


def line_status(code: str | None) -> int:
    """The HTTP status the same request would have had alone."""
    return 404 if code == "model_not_found" else 400


def error_body(message: str, param: str | None, code: str | None, status: int) -> dict[str, Any]:
    return OpenAIError(status, message, param=param, code=code).body()


def dumps(value: Any) -> bytes:
    return (json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

