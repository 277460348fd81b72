"""One attempt of one delivery, from its message to its recorded outcome.

1. Hold the delivery (only the latest dispatch of a pending delivery may: a redelivered
   older message finds nothing and is dropped).
2. Sign and POST the event's payload (`transport`: checked, pinned, deadline-bound).
3. Record the outcome: a 2xx ends it (delivered); otherwise it is due again after a backoff
   (doubling from TANDEM_WEBHOOK_BACKOFF_S up to TANDEM_WEBHOOK_BACKOFF_MAX_S, each delay
   drawn from 75% to 125% of that, so receivers coming back are not hit all at once), until
   TANDEM_WEBHOOK_RETRY_FOR_S after the event: then it is failed.

No transaction is open during the HTTP call. A worker that dies mid-attempt leaves the
delivery held for a while (`HOLD_MARGIN_S` past the attempt's deadline); the dispatcher then
sends it again. So a receiver may see an event twice (at least once): `webhook-id` is the
same each time.
"""

from __future__ import annotations

import json
import logging
import random
import socket
from datetime import UTC, datetime
from typing import Any

from services.settings import Settings
from services.storage import webhook_rows
from services.storage.db import transaction
from services.webhooks import signing, transport, urls
from services.webhooks.addresses import Policy, Resolver
from services.webhooks.events import payload

log = logging.getLogger("tandem.webhooks")

HOLD_MARGIN_S = 30.0


def backoff_s(attempts: int, settings: Settings, rng: random.Random | None = None) -> float:
    """The pause after the `attempts`-th failed attempt (1, 2, ...)."""
    base = settings.webhook_backoff_s * 2 ** min(max(attempts - 1, 0), 40)
    delay = min(base, settings.webhook_backoff_max_s)
    return delay * (rng or random).uniform(0.75, 1.25)


def attempt(
    settings: Settings,
    delivery_id: str,
    dispatch: int,
    resolver: Resolver = socket.getaddrinfo,
) -> str | None:
    """Attempt the delivery if this dispatch may; returns its status afterwards (None: this
    message was not the one to attempt it)."""
    url = settings.database_url
    hold_s = settings.webhook_timeout_s + HOLD_MARGIN_S
    with transaction(url) as session:
        claim = webhook_rows.start_attempt(session, delivery_id, dispatch, hold_s)
    if claim is None:
        return None
    answer = _send(claim, settings, resolver)
    entry: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "status_code": answer.status_code,
        "error": answer.error if not answer.ok else None,
        "duration_ms": round(answer.duration_s * 1000),
    }
    if answer.status_code is not None and not answer.ok:
        entry["error"] = f"HTTP {answer.status_code}" + _snippet(answer.body)
    outcome, retry_in = _next(claim, answer.ok, settings)
    with transaction(url) as session:
        webhook_rows.finish_attempt(session, delivery_id, dispatch, entry, outcome, retry_in)
    level = logging.INFO if answer.ok else logging.WARNING
    log.log(
        level,
        "webhook %s: %s",
        outcome,
        entry["error"] or f"HTTP {answer.status_code}",
        extra={"attempt": claim.attempts + 1},
    )
    return outcome


def _send(claim: webhook_rows.Claim, settings: Settings, resolver: Resolver) -> transport.Answer:
    body = json.dumps(
        payload(claim.event_type, claim.object_id, claim.event_created_at, settings.public_url),
        separators=(",", ":"),
    )
    try:
        target = urls.parse(claim.url)
    except urls.InvalidURL as error:  # checked at creation; kept for safety
        return transport.Answer(None, f"refused: {error}", 0.0)
    return transport.send(
        target,
        signing.headers(claim.secret, claim.event_id, body),
        body.encode(),
        Policy.from_settings(settings),
        settings.webhook_timeout_s,
        settings.webhook_connect_timeout_s,
        resolver,
    )


def _next(claim: webhook_rows.Claim, ok: bool, settings: Settings) -> tuple[str, float | None]:
    if ok:
        return webhook_rows.DELIVERED, None
    delay = backoff_s(claim.attempts + 1, settings)
    if claim.age_s + delay > settings.webhook_retry_for_s:
        return webhook_rows.FAILED, None
    return webhook_rows.PENDING, delay


def _snippet(body: bytes) -> str:
    text = body[:200].decode("utf-8", "replace").strip()
    return f": {text}" if text else ""
