"""API keys: `Authorization: Bearer <key>`; stored as SHA-256 hashes, never in clear."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

from flask import current_app, g, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.api.problems import Problem
from services.storage.db import transaction
from services.storage.models import ApiKey

KEY_PREFIX = "tdm_"
_CACHE_TTL_S = 30.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, owner: str) -> str:
    """Store a new key for `owner` and return it (the only time it is seen in clear)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(owner=owner, key_hash=hash_key(key), prefix=key[:10]))
    return key


class KeyCache:
    """Owner by key hash, cached briefly so a poll does not cost an extra query."""

    def __init__(self) -> None:
        self._owners: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def owner(self, url: str, key: str) -> str | None:
        digest = hash_key(key)
        now = time.monotonic()
        with self._lock:
            hit = self._owners.get(digest)
        if hit and now - hit[1] < _CACHE_TTL_S:
            return hit[0]
        with transaction(url) as session:
            owner = session.scalar(
                select(ApiKey.owner).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
            )
        if owner is not None:
            with self._lock:
                self._owners[digest] = (owner, now)
        return owner


def authenticate() -> str:
    """The owner of the request's key, or a 401 problem."""
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
    owner = cache.owner(current_app.config["TANDEM"].database_url, key.strip())
    if owner is None:
        raise Problem(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    current_app.extensions["tandem.rate"].hit(owner)
    g.owner = owner
    return owner
