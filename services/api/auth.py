"""API keys: `Authorization: Bearer <key>`; stored as SHA-256 hashes, never in clear.

What a request costs Postgres, by the key it sends:
- a key not shaped like ours (`tdm_` + 43 URL-safe characters): nothing, 401 at once;
- a known key: one lookup per key per process every TANDEM_KEY_CACHE_TTL_S (30 s); that
  lookup also sets the key's `last_used_at` (so it is accurate to the TTL, and written once
  per TTL at most, not per request), and a revoked key is refused at most a TTL after;
- an unknown or revoked key: one lookup, then it is remembered as invalid for the TTL (a
  negative cache, bounded in size); and a client address that has tried
  TANDEM_INVALID_KEYS_PER_MINUTE unknown keys this minute gets 429 for any key not already
  known to the process, without a lookup, until the minute is over. A flood of bad keys
  therefore reaches Postgres at most that many times per minute per address per process.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections import OrderedDict
from datetime import timedelta

from flask import current_app, g, request
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from services.api.problems import Problem
from services.settings import Settings
from services.storage.db import transaction
from services.storage.models import ApiKey, utcnow

KEY_PREFIX = "tdm_"
KEY_SHAPE = re.compile(r"tdm_[A-Za-z0-9_-]{43}")  # what create_key makes
NEGATIVE_ENTRIES = 10_000  # unknown keys remembered per process (the oldest go first)
ADDRESSES = 10_000  # client addresses whose failures are counted per process
WINDOW_S = 60.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, owner: str) -> str:
    """Store a new key for `owner` and return it (the only time it is seen in clear)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(owner=owner, key_hash=hash_key(key), prefix=key[:10]))
    return key


class TooManyInvalidKeys(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__("too many invalid keys")
        self.retry_after_s = retry_after_s


class KeyCache:
    """Owner by key hash, cached for the TTL; unknown keys too (see the module docstring)."""

    def __init__(self) -> None:
        self._owners: dict[str, tuple[str, float]] = {}
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._failures: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def owner(self, settings: Settings, key: str, address: str = "") -> str | None:
        """The key's owner, or None for a key that is not valid. Raises TooManyInvalidKeys
        when `address` is over its budget of unknown keys and this key is not known."""
        if not KEY_SHAPE.fullmatch(key):
            return None
        digest = hash_key(key)
        now = time.monotonic()
        ttl = settings.key_cache_ttl_s
        with self._lock:
            hit = self._owners.get(digest)
            if hit and now - hit[1] < ttl:
                return hit[0]
            seen = self._unknown.get(digest)
            if seen is not None and now - seen < ttl:
                return None
            self._check_budget(address, now, settings.invalid_keys_per_minute)
        owner = _look_up(settings.database_url, digest, ttl)
        with self._lock:
            if owner is not None:
                self._owners[digest] = (owner, now)
                self._unknown.pop(digest, None)
            else:
                self._remember_unknown(digest, now)
                self._count_failure(address, now)
        return owner

    def _check_budget(self, address: str, now: float, per_minute: int) -> None:
        if per_minute <= 0:
            return
        start, failures = self._failures.get(address, (now, 0))
        if now - start < WINDOW_S and failures >= per_minute:
            raise TooManyInvalidKeys(max(1, int(WINDOW_S - (now - start)) + 1))

    def _count_failure(self, address: str, now: float) -> None:
        start, failures = self._failures.get(address, (now, 0))
        if now - start >= WINDOW_S:
            start, failures = now, 0
        if address not in self._failures and len(self._failures) >= ADDRESSES:
            self._failures = {
                a: entry for a, entry in self._failures.items() if now - entry[0] < WINDOW_S
            }
            if len(self._failures) >= ADDRESSES:  # that many addresses this minute: start over
                self._failures = {}
        self._failures[address] = (start, failures + 1)

    def _remember_unknown(self, digest: str, now: float) -> None:
        self._unknown[digest] = now
        self._unknown.move_to_end(digest)
        while len(self._unknown) > NEGATIVE_ENTRIES:
            self._unknown.popitem(last=False)


def _look_up(url: str, digest: str, ttl_s: float) -> str | None:
    """The owner of a key that is not revoked; marks it used (unless another process did
    within the TTL)."""
    with transaction(url) as session:
        row = session.execute(
            select(ApiKey.id, ApiKey.owner).where(
                ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)
            )
        ).first()
        if row is None:
            return None
        session.execute(
            update(ApiKey)
            .where(
                ApiKey.id == row.id,
                or_(
                    ApiKey.last_used_at.is_(None),
                    ApiKey.last_used_at < utcnow() - timedelta(seconds=ttl_s),
                ),
            )
            .values(last_used_at=func.now())
        )
        return row.owner


def authenticate() -> str:
    """The owner of the request's key, or a 401 problem (429 for an address sending many
    invalid keys)."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Problem(
            401,
            "missing API key: send 'Authorization: Bearer <key>' "
            "(create one with `tandem keys create --owner NAME`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    cache: KeyCache = current_app.extensions["tandem.keys"]
    try:
        owner = cache.owner(current_app.config["TANDEM"], key.strip(), request.remote_addr or "")
    except TooManyInvalidKeys as limited:
        raise Problem(
            429,
            "too many invalid API keys from this address; wait before trying again",
            headers={"Retry-After": str(limited.retry_after_s)},
        ) from None
    if owner is None:
        raise Problem(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    current_app.extensions["tandem.rate"].hit(owner)
    g.owner = owner
    return owner
