"""The OpenAI wire format we speak: pydantic models of the requests we accept and the
objects we answer, and the error every refusal raises. Framework-free.

The response models are what the routes serialise (`.model_dump()`), and what the
OpenAPI document publishes (`services.api.docs`), so the reference cannot drift from what
is sent. Field names and types follow OpenAI's API reference; tandem's own additions sit
in a `tandem` member (documented in docs/openai.md), which the official SDKs keep as an
extra attribute.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# --- errors ---------------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    504: "timeout",
}


class OpenAIError(Exception):
    """A request refused or failed, answered as `{"error": {...}}` with `status`, so an
    OpenAI SDK raises the matching exception (400 BadRequestError, 401 AuthenticationError,
    404 NotFoundError, 429 RateLimitError, ...) carrying `message`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error on the OpenAI routes."""

    error: ErrorObject


# --- requests -------------------------------------------------------------------------------

_OPEN = ConfigDict(extra="allow")  # parts of a request we read some fields of and pass over
_STRICT = ConfigDict(extra="forbid")


class ContentPart(BaseModel):
    """A part of a message's content: only `text` parts are read; other types (images,
    audio, files) are refused."""

    model_config = _OPEN
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    refusal: str | None = None
    # Fields of tool use: refused when set (tandem runs no tools).
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any | None = None
    audio: Any | None = None


class StreamOptions(BaseModel):
    model_config = _OPEN
    include_usage: bool | None = None


class TandemRequestExtension(BaseModel):
    """`tandem` in a request body (the SDK's `extra_body`): any job parameter
    (README: Job parameters), e.g. `{"params": {"budgets": [0, 100, 500]}}`."""

    model_config = _STRICT
    params: dict[str, Any] = Field(default_factory=dict)


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions (and the `body` of an OpenAI batch line). What each field
    does here is in docs/openai.md; unknown fields are refused (400, naming the field)."""

    model_config = _STRICT
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    reasoning_effort: str | None = None
    # Refused unless absent or neutral (see docs/openai.md).
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any | None = None
    prediction: Any | None = None
    web_search_options: Any | None = None
    # Accepted and ignored: they change nothing about the answer.
    parallel_tool_calls: bool | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    verbosity: str | None = None
    # tandem's extension
    tandem: TandemRequestExtension | None = None


class BatchCreateRequest(BaseModel):
    """POST /v1/batches with a JSON body (the OpenAI Batch API)."""

    model_config = _STRICT
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: Any | None = None


# --- responses: models ----------------------------------------------------------------------


class ModelTandem(BaseModel):
    strategy: str
    cost_preference: str | float | None
    description: str


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tandem"
    tandem: ModelTandem


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


# --- responses: chat completions ------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    """Tokens over every stage of the job, every model: prompt tokens read (the classifier's
    scored text included), tokens generated."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class StageSummary(BaseModel):
    seq: int
    kind: str
    role: str
    model: str
    prompt_tokens: int
    cached_prompt_tokens: int
    generated_tokens: int
    tflops: float
    prefill_tflops: float
    latency_s: float
    finish_reason: str | None = None


class CostTotals(BaseModel):
    tflops: float
    prefill_tflops: float
    prompt_tokens: int
    cached_prompt_tokens: int
    generated_tokens: int


class CompletionTandem(BaseModel):
    """tandem's extension of a chat completion: the job behind it."""

    job_id: str
    status_url: str
    strategy: str
    answer: str | None
    cost: CostTotals
    stages: list[StageSummary] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    # The coordinator's insights (Tandem and fixed:N), in the field OpenAI-compatible
    # reasoning servers use; absent for the other strategies.
    reasoning_content: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    service_tier: str | None = None
    tandem: CompletionTandem


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChunkTandem(BaseModel):
    job_id: str
    stage: StageSummary | None = None
    cost: CostTotals | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed completion (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    tandem: ChunkTandem | None = None


# --- responses: files -----------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


# --- responses: batches ---------------------------------------------------------------------


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchErrorItem(BaseModel):
    code: str | None
    line: int | None
    message: str
    param: str | None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorItem]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class BatchUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails


class BatchTandem(BaseModel):
    """tandem's extension of an OpenAI batch: progress and cost as the native view has them."""

    lines: dict[str, int]
    counts: dict[str, int] | None
    cost: CostTotals | None
    eta_s: float | None
    results_url: str


class OpenAIBatch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating",
        "failed",
        "in_progress",
        "finalizing",
        "completed",
        "expired",
        "cancelling",
        "cancelled",
    ]
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: BatchErrors | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: BatchUsage | None = None
    tandem: BatchTandem


class BatchList(BaseModel):
    """GET /v1/batches: a page of both APIs' batches (docs/openai.md: two APIs, one
    /v1/batches). With the native `status` or `cursor` query, every batch is native and
    first_id / last_id are absent."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]] = Field(
        description="Each batch in the shape of the API that created it: OpenAIBatch, or "
        "the native Batch."
    )
    has_more: bool
    next_cursor: str | None = Field(
        description="The native API's cursor for the next page (`?cursor=`); `?after=` "
        "with last_id works as well."
    )
    first_id: str | None = None
    last_id: str | None = None


RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    ErrorResponse,
    ModelObject,
    ModelList,
    ChatCompletion,
    ChatCompletionChunk,
    FileObject,
    FileList,
    FileDeleted,
    OpenAIBatch,
    BatchList,
)
REQUEST_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionRequest, BatchCreateRequest)
