"""A job's request: question, strategy name and parameters, validated in one place.

The CLI, the REST API and batch lines all build a `JobRequest`, so they accept and reject
exactly the same things with the same messages. Strategy names come from the strategy
registry (`services.core.strategies.STRATEGIES`), so a new strategy is accepted everywhere
once it is registered there.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from services.core.params import JobParams
from services.core.strategies import STRATEGIES, is_strategy


class InvalidRequest(ValueError):
    """A request a client can fix: the message says what was wrong."""


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    question: str
    strategy: str = "tandem"
    params: JobParams = JobParams()

    @field_validator("question")
    @classmethod
    def _question_not_blank(cls, question: str) -> str:
        if not question.strip():
            raise ValueError("question is empty")
        return question

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, strategy: str) -> str:
        if is_strategy(strategy):
            return strategy
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def parse_job_request(data: object, max_question_chars: int) -> JobRequest:
    """Validate raw input (a dict from JSON or the CLI) into a JobRequest, or raise
    InvalidRequest with a message naming every problem."""
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        request = JobRequest.model_validate(data)
    except ValidationError as error:
        raise InvalidRequest(describe_validation_error(error)) from None
    if len(request.question) > max_question_chars:
        raise InvalidRequest(
            f"question is {len(request.question)} characters; the limit is {max_question_chars}"
        )
    return request


def describe_validation_error(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "body"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(f"{where}: {message}")
    return "; ".join(problems)
