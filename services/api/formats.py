"""How the API writes values it shares across resources (timestamps)."""

from __future__ import annotations

from datetime import datetime


def iso(moment: datetime | None) -> str | None:
    """An ISO 8601 timestamp, or None."""
    return moment.isoformat() if moment else None
