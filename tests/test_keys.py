"""API keys: `tandem keys list` / `revoke` as users run them (the real CLI, in a process of
its own), revocation taking effect within the key cache's TTL, `last_used_at` written once
per TTL rather than per request, and a flood of invalid keys kept away from Postgres
(counted: every statement the API process sends about api_keys)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import event, text

from tests import infra


def tandem(service_env: dict[str, str], *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(infra.BIN / "tandem"), *args],
        env={**os.environ, **service_env, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def new_owner() -> str:
    return f"keys-{uuid.uuid4().hex[:8]}"


def create(service_env: dict[str, str], owner: str) -> str:
    done = tandem(service_env, "keys", "create", "--owner", owner)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def listed(service_env: dict[str, str], owner: str) -> list[dict]:
    done = tandem(service_env, "keys", "list", "--owner", owner, "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def app_client(settings, **overrides):
    from services.api import create_app

    return create_app(settings.model_copy(update=overrides), enqueue=lambda t: None).test_client()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def key_statements(database_url: str) -> Iterator[list[str]]:
    """Every statement this process sends about api_keys while the block runs."""
    from services.storage.db import get_engine

    seen: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        if "api_keys" in statement:
            seen.append(statement.split()[0].upper())

    engine = get_engine(database_url)
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_list_shows_prefix_owner_and_last_use_written_once_per_ttl(
    service_env, in_process_settings
) -> None:
    owner = new_owner()
    key = create(service_env, owner)
    [row] = listed(service_env, owner)
    assert row["prefix"] == key[:10] and row["owner"] == owner
    assert row["created_at"] and row["last_used_at"] is None and row["revoked_at"] is None
    client = app_client(in_process_settings, key_cache_ttl_s=30.0)
    with key_statements(in_process_settings.database_url) as statements:
        for _ in range(40):
            assert client.get("/v1/webhook_endpoints", headers=auth(key)).status_code == 200
    # One lookup and one write of last_used_at for 40 requests: not a write per request.
    assert statements.count("SELECT") == 1 and statements.count("UPDATE") == 1, statements
    [row] = listed(service_env, owner)
    assert row["last_used_at"] is not None
    table = tandem(service_env, "keys", "list", "--owner", owner)
    header, line = table.stdout.splitlines()
    assert header.split() == ["id", "prefix", "owner", "created_at", "last_used_at", "revoked_at"]
    assert key[:10] in line and owner in line and line.split()[-1] == "-"


def test_a_revoked_key_is_refused_within_the_cache_ttl(service_env, in_process_settings) -> None:
    owner = new_owner()
    key = create(service_env, owner)
    ttl = 1.0
    client = app_client(in_process_settings, key_cache_ttl_s=ttl)
    assert client.get("/v1/jobs", headers=auth(key)).status_code == 200  # cached now
    done = tandem(service_env, "keys", "revoke", key[:10])
    assert done.returncode == 0 and "revoked" in done.stdout, done.stderr
    revoked_at = time.monotonic()
    while client.get("/v1/jobs", headers=auth(key)).status_code == 200:
        assert time.monotonic() - revoked_at < ttl + 1.0, "still accepted past the TTL"
        time.sleep(0.05)
    refused = client.get("/v1/jobs", headers=auth(key))
    assert refused.status_code == 401 and "revoked" in refused.get_json()["detail"]
    [row] = listed(service_env, owner)
    assert row["revoked_at"] is not None
    again = tandem(service_env, "keys", "revoke", row["id"])
    assert again.returncode == 0 and "already revoked" in again.stdout


def test_revoke_refuses_an_ambiguous_or_unknown_prefix(service_env, in_process_settings) -> None:
    from services.api.auth import hash_key
    from services.storage.db import transaction
    from services.storage.models import ApiKey

    owner = new_owner()
    shared = "tdm_" + secrets.token_hex(3)  # two keys whose shown prefixes collide
    ids = []
    with transaction(in_process_settings.database_url) as session:
        for _ in range(2):
            key = ApiKey(owner=owner, key_hash=hash_key(secrets.token_hex(16)), prefix=shared)
            session.add(key)
            session.flush()
            ids.append(key.id)
    done = tandem(service_env, "keys", "revoke", shared)
    assert done.returncode != 0
    assert "2 keys match" in done.stderr and all(key_id in done.stderr for key_id in ids)
    assert all(row["revoked_at"] is None for row in listed(service_env, owner))
    unknown = tandem(service_env, "keys", "revoke", "tdm_nosuchprefix")
    assert unknown.returncode != 0 and "no API key" in unknown.stderr
    short = tandem(service_env, "keys", "revoke", "tdm")
    assert short.returncode != 0 and "at least 5" in short.stderr
    by_id = tandem(service_env, "keys", "revoke", ids[0])
    assert by_id.returncode == 0
    revoked = {row["id"]: row["revoked_at"] for row in listed(service_env, owner)}
    assert revoked[ids[0]] is not None and revoked[ids[1]] is None


def test_a_flood_of_invalid_keys_does_not_reach_postgres(in_process_settings, api_key) -> None:
    """Malformed keys cost no query; one unknown key repeated costs one (the negative
    cache); distinct unknown keys from one address cost at most the per-minute budget, then
    429 without a query; other addresses and known keys are not affected."""
    budget = 20
    client = app_client(in_process_settings, invalid_keys_per_minute=budget)
    flood = {"REMOTE_ADDR": "10.9.9.9"}
    other = {"REMOTE_ADDR": "10.9.9.10"}
    url = in_process_settings.database_url
    with key_statements(url) as statements:
        assert client.get("/v1/jobs", headers=auth(api_key), environ_base=flood).status_code == 200
    assert len(statements) <= 2  # this process may not have looked alice's key up before

    malformed = ["tdm_short", "garbage", "' OR '1'='1", "tdm_" + "!" * 43, "x" * 5000]
    with key_statements(url) as statements:
        for i in range(300):
            key = malformed[i % len(malformed)]
            response = client.get("/v1/jobs", headers=auth(key), environ_base=flood)
            assert response.status_code == 401
    assert statements == []

    repeated = "tdm_" + secrets.token_urlsafe(32)
    with key_statements(url) as statements:
        for _ in range(300):
            assert client.get("/v1/jobs", headers=auth(repeated), environ_base=flood).status_code == 401
    assert statements == ["SELECT"]

    codes: list[int] = []
    with key_statements(url) as statements:
        for _ in range(300):
            key = "tdm_" + secrets.token_urlsafe(32)
            codes.append(client.get("/v1/jobs", headers=auth(key), environ_base=flood).status_code)
    assert len(statements) <= budget, len(statements)
    assert codes.count(429) >= 300 - budget and set(codes) == {401, 429}
    limited = client.get("/v1/jobs", headers=auth("tdm_" + secrets.token_urlsafe(32)), environ_base=flood)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.mimetype == "application/problem+json"
    # A key the process knows still works from that address; another address is not limited.
    assert client.get("/v1/jobs", headers=auth(api_key), environ_base=flood).status_code == 200
    fresh = app_client(in_process_settings, invalid_keys_per_minute=budget)
    assert fresh.get("/v1/jobs", headers=auth(api_key), environ_base=other).status_code == 200
    assert client.get(
        "/v1/jobs", headers=auth("tdm_" + secrets.token_urlsafe(32)), environ_base=other
    ).status_code == 401


def test_keys_are_stored_hashed(in_process_settings, api_key) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(in_process_settings.database_url)
    with engine.connect() as connection:
        found = connection.execute(
            text("SELECT count(*) FROM api_keys WHERE key_hash = :k OR prefix = :k"), {"k": api_key}
        ).scalar_one()
    engine.dispose()
    assert found == 0
