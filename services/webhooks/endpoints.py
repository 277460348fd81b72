"""Creating a webhook endpoint: what the request may hold, where the URL may point, how
many an owner may have, and the signing secret (returned once, to the creator)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from services.settings import Settings
from services.storage import webhook_rows
from services.storage.models import WebhookEndpoint
from services.webhooks import signing, urls
from services.webhooks.addresses import Policy, RefusedAddress, Resolver, checked_addresses
from services.webhooks.events import EventType, mask_of

MAX_ENDPOINTS = 20  # per owner
FIELDS = ("url", "events")


class EndpointRejected(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class EndpointRequest:
    url: str
    events: list[EventType]


def parse(body: Any, settings: Settings, resolver: Resolver = socket.getaddrinfo) -> EndpointRequest:
    """Check a creation request, the URL's addresses included (422 for what is wrong)."""
    if not isinstance(body, dict):
        raise EndpointRejected(422, "the body must be a JSON object with url and events")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise EndpointRejected(
            422, f"unknown field(s): {', '.join(map(str, unknown))[:200]}; send url and events"
        )
    try:
        target = urls.parse(body.get("url"))
    except urls.InvalidURL as error:
        raise EndpointRejected(422, str(error)) from None
    events = _events(body.get("events"))
    try:
        checked_addresses(
            target.host,
            target.port,
            Policy.from_settings(settings),
            settings.webhook_connect_timeout_s,
            resolver,
        )
    except RefusedAddress as refused:
        raise EndpointRejected(422, f"url refused: {refused}") from None
    return EndpointRequest(body["url"], events)


def _events(raw: Any) -> list[EventType]:
    known = ", ".join(EventType)
    if not isinstance(raw, list) or not raw:
        raise EndpointRejected(422, f"events must be a non-empty list of event types: {known}")
    events: list[EventType] = []
    for item in raw:
        if not isinstance(item, str) or item not in set(EventType):
            shown = repr(item)[:80]
            raise EndpointRejected(422, f"unknown event type {shown}; the types are: {known}")
        if EventType(item) not in events:
            events.append(EventType(item))
    return events


def create(session: Session, owner: str, request: EndpointRequest) -> tuple[WebhookEndpoint, str]:
    """Store the endpoint; returns it and its secret (shown to the creator only)."""
    existing = webhook_rows.endpoints_of(session, owner)
    if len(existing) >= MAX_ENDPOINTS:
        raise EndpointRejected(
            409, f"at most {MAX_ENDPOINTS} webhook endpoints per owner; delete one first"
        )
    for endpoint in existing:
        if endpoint.url == request.url:
            raise EndpointRejected(
                409, f"an endpoint for this url exists already ({endpoint.id}); delete it first"
            )
    secret = signing.new_secret()
    endpoint = WebhookEndpoint(
        owner=owner, url=request.url, event_mask=mask_of(request.events), secret=secret
    )
    session.add(endpoint)
    session.flush()
    return endpoint, secret
