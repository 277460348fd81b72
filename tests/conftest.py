"""Shared fixtures: real Postgres and Redis (started here if none answer), the default
model, and settings pointing at them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import infra


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    with infra.postgres_server() as url:
        yield url


_live: dict[str, str] = {}  # the session's database and Redis, once created


@pytest.fixture(scope="session")
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """A migrated scratch database for the whole session."""
    from services.storage.db import upgrade

    with infra.scratch_database(postgres_admin_url) as url:
        upgrade(url)
        _live["database"] = url
        yield url
        _live.pop("database", None)


@pytest.fixture(autouse=True, scope="module")
def _no_work_left_behind() -> Iterator[None]:
    """After each module, end its unfinished jobs and batches and empty the queues, so one
    module's backlog (a 1,000-line batch) is not fed to the next module's workers."""
    yield
    if "database" in _live:
        infra.end_unfinished_work(_live["database"], _live.get("redis"))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with infra.redis_server() as url:
        _live["redis"] = url
        yield url
        _live.pop("redis", None)


@pytest.fixture(scope="session")
def model_path() -> Path:
    from services.core.backends.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def service_env(database_url: str, redis_url: str) -> dict[str, str]:
    """Environment for the service's processes (and this process) in tests."""
    return {
        "TANDEM_DATABASE_URL": database_url,
        "TANDEM_REDIS_URL": redis_url,
        "TANDEM_STAGE_DEADLINE_S": "6",
        "TANDEM_MAX_STAGE_ATTEMPTS": "3",
        "TANDEM_LOCAL_MAX_BATCH": "4",
        # One llama.cpp thread per process: several worker processes share two cores, and
        # oversubscribed spinning threads make every stage many times slower.
        "TANDEM_LOCAL_THREADS": "1",
    }


@pytest.fixture(scope="session")
def in_process_settings(service_env: dict[str, str]) -> Iterator[object]:
    """Point this process's settings (and its Celery producer) at the test servers."""
    import os

    from services.settings import Settings, get_settings

    saved = {name: os.environ.get(name) for name in service_env}
    os.environ.update(service_env)
    get_settings.cache_clear()
    from workers.app import app

    app.conf.broker_url = service_env["TANDEM_REDIS_URL"]
    yield Settings()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def api_key(in_process_settings) -> str:
    from services.api.auth import create_key
    from services.storage.db import transaction

    with transaction(in_process_settings.database_url) as session:
        return create_key(session, "alice")


@pytest.fixture(scope="session")
def other_key(in_process_settings) -> str:
    from services.api.auth import create_key
    from services.storage.db import transaction

    with transaction(in_process_settings.database_url) as session:
        return create_key(session, "mallory")
