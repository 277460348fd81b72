"""Errors on the OpenAI routes in OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`, with the status an OpenAI SDK maps to the right exception (400 BadRequestError,
401 AuthenticationError, 404 NotFoundError, 409 ConflictError, 429 RateLimitError, 5xx
InternalServerError), carrying our message.

The shared helpers (authentication, rate limits, admission, pages) raise the API's
`Problem`; here it becomes an OpenAIError with the same status, message and headers.
`/v1/batches` is shared with the native API, so its errors carry both shapes at once
(`dual_response`): an RFC 9457 problem (`detail`, `status`) with an `error` member, which
RFC 9457 allows as an extension.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Blueprint, Response, json
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from services.api.openai.protocol import OpenAIError
from services.api.problems import Problem, problem_response

log = logging.getLogger("tandem.api.openai")

CODES = {
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


def from_problem(problem: Problem) -> OpenAIError:
    return OpenAIError(
        problem.status,
        problem.detail,
        code=CODES.get(problem.status),
        headers=problem.headers,
    )


def from_exception(error: Exception, max_body: int | None = None) -> OpenAIError:
    """Any exception as the OpenAIError a client should see (never a trace)."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, Problem):
        return from_problem(error)
    if isinstance(error, HTTPException):
        status = error.code or 500
        message = error.description or error.name
        if status == 413:
            message = "request body too large" + (f"; the limit is {max_body} bytes" if max_body else "")
        return OpenAIError(status, message, code=CODES.get(status))
    if isinstance(error, DataError):
        reason = str(getattr(error, "orig", None) or error).splitlines()[0][:200]
        return OpenAIError(400, f"the request holds a value that cannot be stored: {reason}")
    if isinstance(error, OperationalError | PoolTimeout | DBAPIError):
        log.warning("database unavailable: %s", str(error).splitlines()[0])
        return OpenAIError(
            503,
            "the database is unavailable; retry shortly",
            code="service_unavailable",
            headers={"Retry-After": "5"},
        )
    log.exception("unhandled error", exc_info=error)
    return OpenAIError(500, "internal error; it has been logged")


def response(error: OpenAIError) -> Response:
    answer = Response(json.dumps(error.body()), status=error.status, mimetype="application/json")
    for name, value in error.headers.items():
        answer.headers[name] = value
    return answer


def dual_response(error: OpenAIError) -> Response:
    """The error as a problem (native clients read `detail`) and as OpenAI's `error`."""
    return problem_response(
        error.status, error.message, headers=error.headers, error=error.body()["error"]
    )


def install(bp: Blueprint, max_body: Callable[[], int | None]) -> None:
    """Answer every error of `bp`'s routes in OpenAI's shape."""

    @bp.errorhandler(Exception)
    def _any(error: Exception) -> Response:
        return response(from_exception(error, max_body()))


def dual_errors(view: Callable[..., Any]) -> Callable[..., Any]:
    """Render whatever `view` raises with `dual_response` (the shared /v1/batches routes)."""

    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return view(*args, **kwargs)
        except Exception as error:
            return dual_response(from_exception(error))

    return wrapped
