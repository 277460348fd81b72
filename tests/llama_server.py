"""Start and stop a real llama.cpp OpenAI-compatible server (`llama-cpp-python[server]`)
for tests.

    with LlamaServer() as server:          # the default SmolLM2 GGUF
        backend = OpenAIHTTPBackend(server.url, n_params=server.n_params)

The server runs as a subprocess of `sys.executable` on a free port of 127.0.0.1; start()
waits (with a deadline) until `/v1/models` answers and fails with the tail of the
server's output if it exits or the deadline passes; stop() terminates it (then kills it).

`RecordingProxy(upstream)` sits between a client and a real server: it forwards every
request unchanged (streams included) and keeps each request's path and JSON body, so a
test can assert exactly what the server was sent.

`SimServer(*args)` runs `bench/sim_server.py` (the simulated SGLang server of the capacity
benchmark) the same way, for tests of the SGLang-only parts of the protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import httpx

__all__ = [
    "LlamaServer",
    "LlamaServerError",
    "Recorded",
    "RecordingProxy",
    "SimServer",
    "free_port",
]


class LlamaServerError(RuntimeError):
    """The server could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LlamaServer:
    """One `python -m llama_cpp.server` process serving one GGUF model."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        n_ctx: int = 4096,
        logits_all: bool = True,
        n_threads: int | None = None,
        interrupt_requests: bool = False,
        startup_timeout_s: float = 60.0,
        extra_args: list[str] | None = None,
    ) -> None:
        if model is None:
            from services.core.backends.default_model import default_model_path

            model = default_model_path()
        self.model = Path(model)
        self.n_ctx = n_ctx
        self.logits_all = logits_all
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        # llama-cpp-python cuts a running stream short when another request arrives unless
        # told not to; tests mixing streams and other calls want it off.
        self.interrupt_requests = interrupt_requests
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = list(extra_args or [])
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        if self._proc is None:
            raise LlamaServerError("server not started")
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--logits_all", str(self.logits_all).lower(),
            "--interrupt_requests", str(self.interrupt_requests).lower(),
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> LlamaServer:
        if self._proc is not None:
            return self
        if not self.model.is_file():
            raise LlamaServerError(f"model file not found: {self.model}")
        self.port = free_port()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our signals stay ours; stop() ends only this process
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        assert self._proc is not None
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise LlamaServerError(
                    f"llama.cpp server exited with code {code} during startup:\n{self.output_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise LlamaServerError(
            f"llama.cpp server not ready after {self.startup_timeout_s:.0f}s:\n{self.output_tail()}"
        )

    def output_tail(self, n_chars: int = 4000) -> str:
        """The last part of the server's combined stdout/stderr."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0, os.SEEK_END)
        size = self._log.tell()
        self._log.seek(max(0, size - n_chars))
        return self._log.read().decode("utf-8", "replace")

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    body: Any  # the decoded JSON body, or None


class RecordingProxy:
    """A pass-through HTTP proxy in front of `upstream` that records every request."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._client = httpx.Client(base_url=self.upstream, timeout=120, trust_env=False)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy._forward(self, "GET")

            def do_POST(self) -> None:
                proxy._forward(self, "POST")

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def bodies(self, path: str) -> list[Any]:
        """The JSON bodies sent to `path`, in order."""
        with self._lock:
            return [r.body for r in self.requests if r.path == path]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def _forward(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        with self._lock:
            self.requests.append(Recorded(method, handler.path, body))
        headers = {"Content-Type": handler.headers.get("Content-Type", "application/json")}
        request = self._client.build_request(method, handler.path, content=raw, headers=headers)
        try:
            upstream = self._client.send(request, stream=True)
        except httpx.HTTPError as error:
            handler.send_error(502, explain=str(error))
            return
        try:
            handler.send_response(upstream.status_code)
            kind = upstream.headers.get("content-type", "application/json")
            handler.send_header("Content-Type", kind)
            if "text/event-stream" in kind:  # relay events as they come; close ends it
                handler.send_header("Connection", "close")
                handler.end_headers()
                for chunk in upstream.iter_raw():
                    handler.wfile.write(chunk)
                    handler.wfile.flush()
            else:
                data = upstream.read()
                handler.send_header("Content-Length", str(len(data)))
                handler.end_headers()
                handler.wfile.write(data)
        except OSError:
            pass  # the client went away (e.g. a stream closed early)
        finally:
            upstream.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def __enter__(self) -> RecordingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SimServer:
    """`bench/sim_server.py` as a subprocess on a free port (arguments passed through)."""

    def __init__(self, *args: str, startup_timeout_s: float = 30.0) -> None:
        self.args = list(args)
        self.port = free_port()
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SimServer:
        script = Path(__file__).resolve().parent.parent / "bench" / "sim_server.py"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self._proc = subprocess.Popen(
            [sys.executable, str(script), "--port", str(self.port), *self.args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")
                raise LlamaServerError(f"sim_server exited during startup:\n{err[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise LlamaServerError("sim_server not ready")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
