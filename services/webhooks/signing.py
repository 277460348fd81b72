"""Signing secrets and the Standard Webhooks headers.

    webhook-id         the event's id: the same for every attempt, so a receiver can drop
                       a repeat (delivery is at least once)
    webhook-timestamp  the attempt's time, whole seconds since the epoch
    webhook-signature  "v1," + base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}"))

The secret is `whsec_` + base64 of 32 random bytes; the HMAC key is the decoded bytes. The
signing itself is the `standardwebhooks` package's (the reference library receivers verify
with).
"""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"
USER_AGENT = "tandem-webhooks/1"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def headers(secret: str, message_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
    moment = (now or datetime.now(UTC)).replace(microsecond=0)
    signature = Webhook(secret).sign(message_id, moment, body)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
