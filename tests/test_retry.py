"""Idempotent client calls survive transport blips against a real socket."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest

from services.retry import retry_transport


def serve(answers: list[bytes | None]) -> tuple[int, threading.Thread]:
    """A one-request-per-connection server: None drops the connection unanswered."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def run() -> None:
        with listener:
            for answer in answers:
                connection, _ = listener.accept()
                with connection:
                    connection.recv(65536)
                    if answer is not None:
                        connection.sendall(answer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def test_a_dropped_connection_is_retried() -> None:
    port, thread = serve([None, None, OK])
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        response = retry_transport(lambda: client.get("/"), first_pause_s=0.01)
    assert response.text == "ok"
    thread.join(5)


def test_the_last_error_propagates() -> None:
    port, thread = serve([None, None])
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{port}") as client,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        retry_transport(lambda: client.get("/"), attempts=2, first_pause_s=0.01)
    thread.join(5)
