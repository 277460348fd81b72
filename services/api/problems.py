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
