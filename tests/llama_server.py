"""Start and stop a real llama.cpp OpenAI-compatible server (`llama-cpp-python[server]`)
for tests.

    with LlamaServer() as server:          # the default SmolLM2 GGUF
        backend = OpenAIHTTPBackend(server.url, n_params=server.n_params)

The server runs as a subprocess of `sys.executable` on a free port of 127.0.0.1; start()
waits (with a deadline) until `/v1/models` answers and fails with the tail of the
server's output if it exits or the deadline passes; stop() terminates it (then kills it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx

__all__ = ["LlamaServer", "LlamaServerError", "free_port"]


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
