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
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def query(database_url: str, sql: str, **params: Any) -> list:
    """Rows of `sql`, read straight from Postgres (the source of truth) on a connection of
    its own, opened and closed here."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(sql), params))
    finally:
        engine.dispose()


def keep_submitting(
    client: httpx.Client,
    body: dict[str, Any],
    stop: threading.Event,
    results: list[tuple[float, int, float, str, str]],
    clock: Callable[[], float] = time.monotonic,
    idempotent: bool = False,
    every_s: float = 0.25,
) -> None:
    """A client submitting `body` as a job every `every_s` seconds until `stop` is set (an
    outage test's traffic): appends (sent at, status or 0 for no answer, seconds taken,
    content type, response text) for each; with `idempotent`, each carries a new key."""
    while not stop.is_set():
        started = clock()
        headers = {"Idempotency-Key": uuid.uuid4().hex} if idempotent else {}
        try:
            response = client.post("/v1/jobs", json=body, headers=headers)
            answer = (response.status_code, response.headers.get("content-type", ""), response.text)
        except httpx.HTTPError as error:
            answer = (0, "", repr(error))
        results.append((started, answer[0], clock() - started, answer[1], answer[2]))
        time.sleep(every_s)


def end_unfinished_work(database_url: str, redis_url: str | None) -> None:
    """Cancel every unfinished job and batch, and drop the stage queues' messages.

    The services may still be running (a feeder filling a batch, a worker recording), so
    each statement commits on its own and one that loses a deadlock to them is retried."""
    import redis
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    statements = (
        "UPDATE batches SET status = 'cancelled' "
        "WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling')",
        "UPDATE jobs SET status = 'cancelled', cancel_requested = true "
        "WHERE status IN ('queued', 'running')",
    )
    engine = create_engine(database_url)
    for statement in statements:
        for attempt in range(1, 6):
            try:
                with engine.begin() as connection:
                    connection.execute(text(statement))
                break
            except OperationalError as error:
                if "deadlock detected" not in str(error) or attempt == 5:
                    raise
                time.sleep(0.05 * attempt)
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
def throwaway_redis(
    port: int | None = None, bind: Sequence[str] = ("127.0.0.1",), netns: str | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A redis-server of its own; `bind` its addresses (the URL is on the first, which this
    process must reach), `netns` the network namespace it runs in (`NetworkLab`)."""
    port = port or free_port()
    directory = tempfile.mkdtemp(prefix="tandem-redis-")
    process = subprocess.Popen(
        [
            *in_netns(netns),
            "redis-server",
            "--port",
            str(port),
            "--bind",
            *bind,
            # (clients on other hosts: a throwaway server on addresses of the test's own)
            "--protected-mode",
            "yes" if set(bind) <= {"127.0.0.1", "::1"} else "no",
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
        wait_for(lambda: port_open(bind[0], port), 10, "redis-server")
        yield f"redis://{bind[0]}:{port}", process
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

    def start(self, name: str, argv: list[str], netns: str | None = None) -> subprocess.Popen:
        """Start `argv` (in network namespace `netns`, if given), logging to NAME.log."""
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (owned by the process)
        process = subprocess.Popen(
            [*in_netns(netns), *argv],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        self.running[name] = process
        return process

    def worker(
        self, queue: str, concurrency: int = 4, name: str | None = None, netns: str | None = None
    ) -> subprocess.Popen:
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
            netns,
        )

    def api(self, port: int, host: str = "127.0.0.1", netns: str | None = None) -> subprocess.Popen:
        argv = [str(BIN / "tandem"), "api", "--host", host, "--port", str(port)]
        process = self.start("api", [*argv, "--workers", "1", "--threads", "16"], netns)
        wait_for(
            lambda: httpx.get(f"http://{host}:{port}/healthz").status_code == 200,
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

    def __init__(self, listen: Sequence[str] = ("127.0.0.1",), netns: str | None = None) -> None:
        """`listen`: its addresses (the admin URL uses the first, which this process must
        reach); `netns`: the network namespace it runs in (`NetworkLab`)."""
        self.data = Path(tempfile.mkdtemp(prefix="tandem-pg-"))
        self.port = free_port()
        self.listen = list(listen)
        self._in_netns = in_netns(netns)
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_user:
            shutil.chown(self.data, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        if any(address not in ("127.0.0.1", "localhost") for address in self.listen):
            with open(self.data / "pg_hba.conf", "a") as hba:  # clients on other hosts
                hba.write("host all all 0.0.0.0/0 trust\n")

    def _run(self, binary: str, *args: str, check: bool = True) -> None:
        argv = [*self._in_netns, *self._as_user, _pg_bin(binary), *args]
        subprocess.run(argv, check=check, capture_output=True)

    @property
    def admin_url(self) -> str:
        return self.url_on(self.listen[0])

    def url_on(self, address: str, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@{address}:{self.port}/{database}"

    def start(self) -> None:
        hosts = ",".join(self.listen)
        options = f"-p {self.port} -k {self.data} -h {hosts} -c fsync=off -c max_connections=200"
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


# --- separate hosts on this machine: network namespaces --------------------------------------


def in_netns(netns: str | None) -> list[str]:
    """The argv prefix that runs a command inside network namespace `netns` (none: here)."""
    return ["ip", "netns", "exec", netns] if netns else []


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Link:
    """A veth pair between two hosts (None: this process's namespace); /30 addresses."""

    name: str
    a: str | None
    b: str | None
    a_if: str
    b_if: str
    a_addr: str
    b_addr: str


class NetworkLab:
    """Hosts as network namespaces on this machine (Linux, root, iproute2), joined by veth
    pairs, point to point: each link is its own /30, so taking one link down cuts exactly
    one path (a service's clients from it) and nothing else. Names are unique per lab (a
    random prefix), so concurrent runs do not collide; `close` removes every namespace and
    link it made, and ends the processes still inside them (which this run started)."""

    _made = 0

    def __init__(self) -> None:
        self.sweep_stale()
        NetworkLab._made += 1
        # "tf" + this process's pid + a counter: unique per run, and `sweep_stale` can tell
        # a lab whose process died (SIGKILL: no finally ran) from one in use.
        self.prefix = f"tf{os.getpid():06x}{NetworkLab._made % 36:x}"
        self.octet = 64 + int(uuid.uuid4().hex[:4], 16) % 180  # 10.OCTET.n.0/30 per link
        self.hosts: dict[str, str] = {}
        self.links: dict[str, Link] = {}

    @staticmethod
    def sweep_stale() -> None:
        """Remove the namespaces of labs whose test process is gone (and the processes it
        started in them)."""
        import re

        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        for line in listed.stdout.splitlines():
            match = re.match(r"^(tf([0-9a-f]{6})[0-9a-f]-\S+)", line)
            if not match:
                continue
            try:
                os.kill(int(match.group(2), 16), 0)
                continue  # its process lives
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            _remove_netns(match.group(1))

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be made here, or None."""
        if os.geteuid() != 0:
            return "needs root (network namespaces): CI and these machines run it as root"
        if shutil.which("ip") is None:
            return "no `ip` command: run scripts/install_test_deps.sh (installs iproute2)"
        probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        if probe.returncode != 0:
            return f"`ip netns` unavailable ({probe.stderr.strip()[:200]}): run scripts/install_test_deps.sh"
        return None

    def host(self, name: str) -> str:
        """A new namespace (loopback up); returns its name for `ip netns exec`."""
        netns = f"{self.prefix}-{name}"
        _ip("netns", "add", netns)
        self.hosts[name] = netns
        _ip("-n", netns, "link", "set", "lo", "up")
        return netns

    def link(self, name: str, a: str | None, b: str | None) -> Link:
        """Join hosts `a` and `b` (names given to `host`; None: this process's namespace)."""
        index = len(self.links) + 1
        a_if, b_if = f"{self.prefix}{index}a", f"{self.prefix}{index}b"
        a_addr, b_addr = f"10.{self.octet}.{index}.1", f"10.{self.octet}.{index}.2"
        _ip("link", "add", a_if, "type", "veth", "peer", "name", b_if)
        for host, interface, address in ((a, a_if, a_addr), (b, b_if, b_addr)):
            if host is not None:
                _ip("link", "set", interface, "netns", self.hosts[host])
            ns = ["-n", self.hosts[host]] if host is not None else []
            _ip(*ns, "addr", "add", f"{address}/30", "dev", interface)
            _ip(*ns, "link", "set", interface, "up")
        link = Link(name, a, b, a_if, b_if, a_addr, b_addr)
        self.links[name] = link
        return link

    def set_link(self, name: str, up: bool) -> None:
        """Take link `name` down (at its `a` end: the peer sees its carrier go, packets to it
        are dropped, as when a cable is pulled on the far side of a switch) or back up."""
        link = self.links[name]
        ns = ["-n", self.hosts[link.a]] if link.a is not None else []
        _ip(*ns, "link", "set", link.a_if, "up" if up else "down")

    def close(self) -> None:
        for netns in self.hosts.values():
            _remove_netns(netns)
        for link in self.links.values():  # ends in this namespace (gone with their peers)
            if link.a is None or link.b is None:
                for interface in (link.a_if, link.b_if):
                    subprocess.run(["ip", "link", "del", interface], capture_output=True)
        self.hosts.clear()
        self.links.clear()


def _remove_netns(netns: str) -> None:
    """Kill what still runs in a namespace of ours (processes this run started), delete it."""
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    for pid in pids.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", netns], capture_output=True)
