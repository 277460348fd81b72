"""One HTTP attempt to a receiver, safe to make from a worker thread.

- The host is resolved once and every address checked (`addresses`); the connection goes to
  the checked address (a network backend pinned to it), while the URL keeps its host name,
  so the Host header, TLS SNI and certificate check are the name's. No second DNS lookup.
- A hard deadline on the whole attempt (connect, TLS, send, answer): every socket operation
  gets at most the time left, so a receiver that never answers, or answers a byte at a
  time, holds the thread for `timeout_s` and no longer.
- Redirects are not followed (a 3xx is an answer like any other non-2xx), no proxy from the
  environment is used, and at most `MAX_ANSWER_BYTES` of the answer are read.

httpcore (under httpx) is used directly: it lets the connection be pinned to an address.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpcore

from services.webhooks.addresses import Policy, RefusedAddress, Resolver, checked_addresses
from services.webhooks.urls import Target

MAX_ANSWER_BYTES = 1024  # of the receiver's answer, kept for the delivery log
_ssl_context: ssl.SSLContext | None = None
_ssl_lock = threading.Lock()


@dataclass(frozen=True)
class Answer:
    """An attempt's result: the receiver's status code (None if none came) or the error."""

    status_code: int | None
    error: str | None
    duration_s: float
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def send(
    target: Target,
    headers: dict[str, str],
    body: bytes,
    policy: Policy,
    timeout_s: float,
    connect_timeout_s: float,
    resolver: Resolver = socket.getaddrinfo,
) -> Answer:
    """POST `body` to `target`; never raises for what the receiver or the network does."""
    started = time.monotonic()
    deadline = started + timeout_s

    def took() -> float:
        return time.monotonic() - started

    try:
        address = checked_addresses(
            target.host, target.port, policy, min(connect_timeout_s, timeout_s), resolver
        )[0]
    except RefusedAddress as refused:
        return Answer(None, f"refused: {refused}", took())
    pool = httpcore.ConnectionPool(
        ssl_context=_context() if target.scheme == "https" else None,
        max_connections=1,
        network_backend=_PinnedBackend(address, deadline),
    )
    left = max(deadline - time.monotonic(), 0.001)
    timeouts = {"connect": min(connect_timeout_s, left), "read": left, "write": left, "pool": left}
    host = f"[{target.host}]" if ":" in target.host else target.host
    url = f"{target.scheme}://{host}:{target.port}{target.path}"
    try:
        with pool.stream(
            "POST",
            url,
            headers=[(name.encode(), value.encode()) for name, value in headers.items()],
            content=body,
            extensions={"timeout": timeouts},
        ) as response:
            answer = _first_bytes(response.iter_stream())
            return Answer(response.status, None, took(), answer)
    except httpcore.ConnectTimeout:
        return Answer(None, f"could not connect within {connect_timeout_s:g} s", took())
    except httpcore.TimeoutException:  # the deadline, or a read or write that ran into it
        return Answer(None, f"no complete answer within {timeout_s:g} s", took())
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as error:
        return Answer(None, f"{type(error).__name__}: {error or 'connection failed'}", took())
    except ssl.SSLError as error:
        return Answer(None, f"TLS: {error}", took())
    finally:
        pool.close()


def _first_bytes(chunks: Iterable[bytes]) -> bytes:
    kept = b""
    for chunk in chunks:
        kept += chunk[: MAX_ANSWER_BYTES - len(kept)]
        if len(kept) >= MAX_ANSWER_BYTES:
            break
    return kept


def _context() -> ssl.SSLContext:
    global _ssl_context
    with _ssl_lock:
        if _ssl_context is None:
            import certifi

            _ssl_context = ssl.create_default_context(cafile=certifi.where())
        return _ssl_context


class _DeadlinePassed(httpcore.ReadTimeout):
    pass


class _PinnedBackend(httpcore.SyncBackend):
    """Connects to the checked address whatever host the URL names; every stream it makes
    keeps to the attempt's deadline."""

    def __init__(self, address: str, deadline: float) -> None:
        self.address = address
        self.deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        stream = super().connect_tcp(
            self.address, port, _left(self.deadline, timeout), local_address, socket_options
        )
        return _DeadlineStream(stream, self.deadline)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self.inner = inner
        self.deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, _left(self.deadline, timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, _left(self.deadline, timeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        upgraded = self.inner.start_tls(
            ssl_context, server_hostname, _left(self.deadline, timeout)
        )
        return _DeadlineStream(upgraded, self.deadline)

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


def _left(deadline: float, timeout: float | None) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _DeadlinePassed("the attempt's deadline passed")
    return left if timeout is None else min(timeout, left)
