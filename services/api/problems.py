"""RFC 9457 problem responses: every error a client sees says what was wrong, never a trace.

`install` registers the handlers that turn exceptions into problems, and one check that
runs before every view: a URL whose path or query string holds text no store can keep (a
NUL, from %00) is answered 422 naming the part, before it can reach a SQL parameter.
Requests gunicorn cannot even parse (a URL or header over its limits) are answered as
problems too, by `unparsed_request_response` (see `tandem api`)."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, json
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from services.core.requests import shown, unstorable

log = logging.getLogger("tandem.api")


class Problem(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title
        self.headers = headers or {}
        self.extra = extra


def problem_response(
    status: int,
    detail: str,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    from http import HTTPStatus

    body = {
        "type": "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extra,
    }
    response = Response(json.dumps(body), status=status, mimetype="application/problem+json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def refuse_unstorable_url() -> None:
    """Path ids and query strings go into SQL parameters: a value Postgres cannot hold is
    the client's error (422), found here rather than by the database."""
    from flask import request

    if problem := unstorable(request.path):
        raise Problem(422, f"the URL's path {problem}")
    for name, value in request.args.items(multi=True):
        if problem := unstorable(name):
            raise Problem(422, f"a query parameter's name {problem}")
        if problem := unstorable(value):
            raise Problem(422, f"query parameter {shown(name)}: {problem}")


def install(app: Flask) -> None:
    app.before_request(refuse_unstorable_url)

    @app.errorhandler(Problem)
    def _problem(error: Problem) -> Response:
        return problem_response(
            error.status, error.detail, error.title, error.headers, **error.extra
        )

    @app.errorhandler(HTTPException)
    def _http(error: HTTPException) -> Response:
        detail = error.description or error.name
        if error.code == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            detail = f"request body too large; the limit is {limit} bytes"
        headers = {}
        if error.code == 405 and error.valid_methods:
            headers["Allow"] = ", ".join(error.valid_methods)
        return problem_response(error.code or 500, detail, headers=headers)

    @app.errorhandler(DataError)
    def _unstorable(error: DataError) -> Response:
        # A value Postgres refuses (a NUL character in text, say): the client's to fix, and
        # retrying will not help, so not a 503.
        reason = str(getattr(error, "orig", None) or error).splitlines()[0][:200]
        return problem_response(422, f"the request holds a value that cannot be stored: {reason}")

    @app.errorhandler(OperationalError)
    @app.errorhandler(PoolTimeout)
    @app.errorhandler(DBAPIError)
    def _database_down(error: Exception) -> Response:
        log.warning("database unavailable: %s", str(error).splitlines()[0])
        return problem_response(
            503, "the database is unavailable; retry shortly", headers={"Retry-After": "5"}
        )

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error")
        return problem_response(500, "internal error; it has been logged")


def unparsed_request_response(error: Exception, cfg: Any) -> bytes | None:
    """The whole HTTP response (problem+json) for a request gunicorn could not parse: a
    request line over `limit_request_line` (414), headers over `limit_request_fields` /
    `limit_request_field_size` (431), anything malformed (400). None for an error that is
    not the client's (gunicorn's own 500 handling applies). `cfg` is gunicorn's config."""
    from http import HTTPStatus

    from gunicorn.http import errors

    if isinstance(error, errors.InvalidResponseHeader | errors.InvalidResponseHeaderName):
        return None  # a header the application tried to send: not the client's fault
    if isinstance(error, errors.LimitRequestLine):
        status = 414
        detail = f"the URL is too long: a request line may be at most {cfg.limit_request_line} bytes"
    elif isinstance(error, errors.LimitRequestHeaders):
        status = 431
        if "size" in str(error):
            detail = f"a request header is too large: the limit is {cfg.limit_request_field_size} bytes"
        else:
            detail = f"too many request headers: the limit is {cfg.limit_request_fields}"
    elif isinstance(error, errors.UnsupportedTransferCoding):
        status, detail = 501, f"unsupported transfer coding: {str(error)[:200]}"
    elif isinstance(error, errors.ExpectationFailed):
        status, detail = 417, f"cannot meet the Expect header: {str(error)[:200]}"
    elif isinstance(error, errors.ForbiddenProxyRequest):
        status, detail = 403, "proxy request forbidden"
    elif isinstance(error, errors.ConfigurationProblem):
        return None
    elif isinstance(error, errors.ParseException):
        status, detail = 400, f"malformed HTTP request: {str(error)[:200]}"
    else:
        return None
    body = json.dumps(
        {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/problem+json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body
