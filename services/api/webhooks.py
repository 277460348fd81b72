"""/v1/webhook_endpoints: create (the secret is in this answer only), list, read, delete, and
each endpoint's deliveries with their attempts. An endpoint belongs to its key's owner;
another owner's looks exactly like a missing one (404). The logic is in services.webhooks."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from services.api import pages
from services.api.auth import authenticate
from services.api.docs import ERRORS, add_paths
from services.api.formats import iso
from services.api.jobs import json_body
from services.api.problems import Problem
from services.storage import webhook_rows
from services.storage.db import transaction
from services.storage.models import WebhookDelivery, WebhookEndpoint
from services.webhooks import endpoints
from services.webhooks.events import EventType, events_of

bp = Blueprint("webhooks", __name__, url_prefix="/v1/webhook_endpoints")

MAX_BODY_BYTES = 16 * 1024
DELIVERY_STATUSES = (webhook_rows.PENDING, webhook_rows.DELIVERED, webhook_rows.FAILED)


def settings():
    return current_app.config["TANDEM"]


def endpoint_json(endpoint: WebhookEndpoint, secret: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": endpoint.id,
        "object": "webhook_endpoint",
        "url": endpoint.url,
        "events": events_of(endpoint.event_mask),
        "created_at": iso(endpoint.created_at),
    }
    if secret is not None:
        body["secret"] = secret
    return body


def delivery_json(delivery: WebhookDelivery) -> dict[str, Any]:
    event = delivery.event
    return {
        "id": delivery.id,
        "object": "webhook_delivery",
        "event": {
            "id": event.id,
            "type": event.type,
            "object_id": event.object_id,
            "created_at": iso(event.created_at),
        },
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": iso(delivery.next_attempt_at) if delivery.status == "pending" else None,
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "history": delivery.history or [],
        "created_at": iso(delivery.created_at),
        "finished_at": iso(delivery.finished_at),
    }


def _owned(session, endpoint_id: str, owner: str) -> WebhookEndpoint:
    endpoint = webhook_rows.owned_endpoint(session, endpoint_id, owner)
    if endpoint is None:
        raise Problem(404, f"no webhook endpoint {endpoint_id[:40]!r}")
    return endpoint


@bp.post("")
def create_endpoint() -> tuple[Response, int, dict[str, str]]:
    owner = authenticate()
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise Problem(413, f"a webhook endpoint's body is limited to {MAX_BODY_BYTES} bytes")
    body = json_body()
    try:
        parsed = endpoints.parse(body, settings())
        with transaction(settings().database_url) as session:
            endpoint, secret = endpoints.create(session, owner, parsed)
            answer = endpoint_json(endpoint, secret)
    except endpoints.EndpointRejected as rejected:
        raise Problem(rejected.status, rejected.detail) from None
    return jsonify(answer), 201, {"Location": f"{bp.url_prefix}/{endpoint.id}"}


@bp.get("")
def list_endpoints() -> Response:
    owner = authenticate()
    pages.check_query(request.args, ())
    with transaction(settings().database_url) as session:
        data = [endpoint_json(e) for e in webhook_rows.endpoints_of(session, owner)]
    return jsonify({"object": "list", "data": data, "has_more": False, "next_cursor": None})


@bp.get("/<endpoint_id>")
def get_endpoint(endpoint_id: str) -> Response:
    owner = authenticate()
    with transaction(settings().database_url) as session:
        return jsonify(endpoint_json(_owned(session, endpoint_id, owner)))


@bp.delete("/<endpoint_id>")
def delete_endpoint(endpoint_id: str) -> Response:
    owner = authenticate()
    with transaction(settings().database_url) as session:
        endpoint = _owned(session, endpoint_id, owner)
        webhook_rows.delete_endpoint(session, endpoint.id, owner)
    return jsonify({"id": endpoint.id, "object": "webhook_endpoint", "deleted": True})


@bp.get("/<endpoint_id>/deliveries")
def list_deliveries(endpoint_id: str) -> Response:
    owner = authenticate()
    args = request.args
    pages.check_query(args, ("status", "limit", "cursor"))
    status = args.get("status")
    if status is not None and status not in DELIVERY_STATUSES:
        raise Problem(400, f"status must be one of {', '.join(DELIVERY_STATUSES)}")
    with transaction(settings().database_url) as session:
        endpoint = _owned(session, endpoint_id, owner)
        query = webhook_rows.deliveries_query(endpoint.id, status)
        page = pages.newest_first(session, query, WebhookDelivery, args, 50, delivery_json)
    return jsonify(page)


# --- OpenAPI ----------------------------------------------------------------------------

_ID = {"name": "endpoint_id", "in": "path", "required": True, "schema": {"type": "string"}}
_ENDPOINT = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["webhook_endpoint"]},
        "url": {"type": "string"},
        "events": {"type": "array", "items": {"type": "string", "enum": list(EventType)}},
        "secret": {"type": "string", "description": "only in the answer to its creation"},
        "created_at": {"type": "string"},
    },
}
_CREATE = {
    "type": "object",
    "required": ["url", "events"],
    "additionalProperties": False,
    "properties": {
        "url": {"type": "string", "maxLength": 2048, "description": "https:// or http://"},
        "events": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "string", "enum": list(EventType)},
        },
    },
}
_JSON_ENDPOINT = {
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/WebhookEndpoint"}}}
}

add_paths(
    {
        "/v1/webhook_endpoints": {
            "post": {
                "summary": "Create a webhook endpoint (its signing secret is shown only here)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/WebhookEndpointRequest"}
                        }
                    },
                },
                "responses": {
                    "201": {"description": "created", **_JSON_ENDPOINT},
                    "409": ERRORS["400"],
                    **ERRORS,
                },
            },
            "get": {
                "summary": "The owner's webhook endpoints",
                "responses": {"200": {"description": "the endpoints"}, **ERRORS},
            },
        },
        "/v1/webhook_endpoints/{endpoint_id}": {
            "get": {
                "summary": "A webhook endpoint",
                "parameters": [_ID],
                "responses": {"200": {"description": "the endpoint", **_JSON_ENDPOINT}, **ERRORS},
            },
            "delete": {
                "summary": "Delete a webhook endpoint (its pending deliveries are dropped)",
                "parameters": [_ID],
                "responses": {"200": {"description": "deleted"}, **ERRORS},
            },
        },
        "/v1/webhook_endpoints/{endpoint_id}/deliveries": {
            "get": {
                "summary": "An endpoint's deliveries, newest first, with every attempt",
                "parameters": [
                    _ID,
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(DELIVERY_STATUSES)},
                    },
                    *pages.OPENAPI_PARAMETERS,
                ],
                "responses": {"200": {"description": "a page of deliveries"}, **ERRORS},
            }
        },
    },
    {"WebhookEndpoint": _ENDPOINT, "WebhookEndpointRequest": _CREATE},
)
