"""Cursor pages for the list endpoints: newest first, by (created_at, id). A cursor is the
last row of the page before, so a page never repeats or skips a row while rows are added."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from services.api.problems import Problem
from services.core.requests import unstorable

MAX_PAGE = 200
# The query parameters of every cursor-paged list, as the OpenAPI document states them.
OPENAPI_PARAMETERS = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
]


def check_query(args: Mapping[str, str], allowed: Iterable[str]) -> None:
    unknown = set(args) - set(allowed)
    if unknown:
        raise Problem(400, f"unknown query parameter(s): {', '.join(sorted(unknown))}")


def newest_first(
    session: Session,
    query: Select,
    model: Any,
    args: Mapping[str, str],
    default_limit: int,
    to_json: Callable[[Any], dict[str, Any]],
) -> dict[str, Any]:
    """One page of `query`'s rows (of `model`, which has created_at and id) as a list
    body; `limit` and `cursor` come from the query string."""
    limit = _limit(args.get("limit", str(default_limit)))
    if cursor := args.get("cursor"):
        created, last_id = _decode_cursor(cursor)
        query = query.where(
            or_(model.created_at < created, and_(model.created_at == created, model.id < last_id))
        )
    query = query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query))
    more = len(rows) > limit
    return {
        "object": "list",
        "data": [to_json(row) for row in rows[:limit]],
        "has_more": more,
        "next_cursor": _encode_cursor(rows[limit - 1]) if more else None,
    }


def _limit(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= MAX_PAGE:
        raise Problem(400, f"limit must be a whole number from 1 to {MAX_PAGE}")
    return int(raw)


def _encode_cursor(row: Any) -> str:
    raw = json.dumps([row.created_at.isoformat(), row.id])
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, row_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not isinstance(row_id, str) or unstorable(row_id):  # it goes into a SQL parameter
            raise ValueError(row_id)
        return datetime.fromisoformat(created), row_id
    except (ValueError, TypeError, binascii.Error, UnicodeError):
        raise Problem(400, "cursor is not one this API returned") from None
