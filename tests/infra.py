"""Real servers for the tests: the machine's Postgres and Redis when they answer, else
throwaway ones started from the installed server binaries; and the service's own
processes (API, Celery workers, reconciler) started the way users start them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def wait_for(check, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def metric_total(port: int, name: str) -> float:
    """The sum over every label set of metric `name` on a process's /metrics at `port`."""
    import re

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    pattern = rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$"
    return sum(float(value) for value in re.findall(pattern, text, flags=re.M))


# --- the model -------------------------------------------------------------------------


def reference_logits(model_path: Path, text: str) -> tuple[list[int], object]:
    """All-position logits of `text` from llama.cpp's high-level API, computed with the
    kernels the local engine uses (flash attention, 8-bit KV cache, decode calls under 64
    tokens); any other path differs by llama.cpp's own rounding (up to ~0.5 nats on this
    Q4 model) rather than by any mistake of ours."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        str(model_path),
        n_ctx=1024,
        n_batch=32,
        n_ubatch=32,
        n_threads=1,
        n_threads_batch=1,
        flash_attn=True,
        type_k=llama_cpp.GGML_TYPE_Q8_0,
        type_v=llama_cpp.GGML_TYPE_Q8_0,
        logits_all=True,
        verbose=False,
    )
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True, special=True)
        llm.eval(tokens)
        return tokens, np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


# --- Postgres ---------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise RuntimeError(f"no {name} binary: install PostgreSQL (apt-get install postgresql)")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A Postgres admin URL: the configured one if it answers, else a throwaway cluster."""
    url = os.environ.get(
        "TANDEM_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    if _pg_answers(url):
        yield url
        return
    data = Path(tempfile.mkdtemp(prefix="tandem-pg-"))
    port = free_port()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(data, "postgres")
    subprocess.run(
        [*as_user, _pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_user,
            _pg_bin("pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(data / "log"),
            "-o",
            f"-p {port} -k {data} -h 127.0.0.1 -c fsync=off",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(data, ignore_errors=True)


def _pg_answers(url: str) -> bool:
    from sqlalchemy import create_engine, text

    engine = create_engine(url, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


@contextlib.contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """A new empty database on the server, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"tandem_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        from services.storage.db import dispose_engines

        dispose_engines()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def end_unfinished_work(database_url: str, redis_url: str | None) -> None:
    """Cancel every unfinished job and batch, and drop the stage queues' messages."""
    import redis
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE jobs SET status = 'cancelled', cancel_requested = true "
                "WHERE status IN ('queued', 'running')"
            )
        )
        connection.execute(
            text(
                "UPDATE batches SET status = 'cancelled' "
                "WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling')"
            )
        )
    engine.dispose()
    if redis_url:
        from services.queues import STAGE_QUEUES

        client = redis.Redis.from_url(redis_url)
        client.delete(*STAGE_QUEUES)
        client.close()


# --- Redis ------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A Redis URL on an empty logical database: the configured server if it answers, else
    a throwaway redis-server."""
    import redis

    url = os.environ.get("TANDEM_TEST_REDIS", "redis://127.0.0.1:6379")
    if port_open("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0])):
        with _empty_db(url) as db_url:
            yield db_url
        return
    with throwaway_redis() as (throwaway, _process):
        yield f"{throwaway}/0"
    del redis


@contextlib.contextmanager
def _empty_db(base_url: str) -> Iterator[str]:
    import redis

    for index in range(15, 0, -1):
        client = redis.Redis.from_url(f"{base_url}/{index}")
        # Claim a logical database: SETNX a marker so parallel test runs do not share one.
        if client.dbsize() == 0 and client.set("tandem:test:claim", "1", nx=True, ex=3600):
            try:
                yield f"{base_url}/{index}"
            finally:
                client.flushdb()
                client.close()
            return
        client.close()
    raise RuntimeError("no empty Redis logical database to test in")


@contextlib.contextmanager
def throwaway_redis(port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    port = port or free_port()
    directory = tempfile.mkdtemp(prefix="tandem-redis-")
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open("127.0.0.1", port), 10, "redis-server")
        yield f"redis://127.0.0.1:{port}", process
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


# --- the service's processes -----------------------------------------------------------


def die_with_parent() -> None:
    """In the child: get SIGKILL when the test (or bench) process dies, however it dies, so
    no worker outlives the run that started it (Linux prctl PR_SET_PDEATHSIG). SIGKILL, not
    SIGTERM: a Celery worker's warm shutdown would wait for its stage to finish."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class Processes:
    """Starts and stops the service's processes with a shared environment."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (owned by the process)
        process = subprocess.Popen(
            argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        self.running[name] = process
        return process

    def worker(self, queue: str, concurrency: int = 4, name: str | None = None) -> subprocess.Popen:
        """A Celery worker for a role (`queue` names it), consuming the role's lanes in order
        of priority, as deployments run it."""
        from services.queues import ROLES, role_queues

        name = name or queue
        queues = ",".join(role_queues(queue)) if queue in ROLES else queue
        return self.start(
            name,
            [
                str(BIN / "celery"),
                "-A",
                "workers",
                "worker",
                "-Q",
                queues,
                "-n",
                f"{name}@%h",
                "--pool",
                "threads",
                "--concurrency",
                str(concurrency),
                "--loglevel",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
        )

    def api(self, port: int) -> subprocess.Popen:
        process = self.start(
            "api",
            [str(BIN / "tandem"), "api", "--port", str(port), "--workers", "1", "--threads", "16"],
        )
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200,
            30,
            "the API",
            interval=0.2,
        )
        return process

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.running.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        process.wait(30)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop_all(self) -> None:
        for name in list(self.running):
            process = self.running[name]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for name in list(self.running):
            try:
                self.running[name].wait(15)
            except subprocess.TimeoutExpired:
                self.kill(name)
        self.running.clear()


class ThrowawayPostgres:
    """A Postgres cluster of its own on a fixed free port, which a test can stop and start
    again (to take the database away from running services). Initialised as the `postgres`
    user when run as root, like `postgres_server()`."""

    def __init__(self) -> None:
        self.data = Path(tempfile.mkdtemp(prefix="tandem-pg-"))
        self.port = free_port()
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_user:
            shutil.chown(self.data, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def _run(self, binary: str, *args: str, check: bool = True) -> None:
        subprocess.run([*self._as_user, _pg_bin(binary), *args], check=check, capture_output=True)

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -h 127.0.0.1 -c fsync=off -c max_connections=200"
        log = str(self.data / "log")
        self._run(
            "pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-l", log, "-o", options, "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        self.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.remove()
