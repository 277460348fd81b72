"""Webhooks for real: Postgres, Redis, a Celery worker on the `webhooks` queue, the
reconciler dispatching, and a real HTTP receiver on 127.0.0.1 that verifies every signature
with the `standardwebhooks` package (the reference library a receiver uses).

The receiver's paths behave differently: /ok answers 204, /flaky 500 then 200, /hang never
answers, /drip answers a byte at a time forever, /redirect 302s to /ok.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import text
from standardwebhooks import Webhook, WebhookVerificationError

from tests import infra

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
TIMEOUT_S = 2.0  # the workers' TANDEM_WEBHOOK_TIMEOUT_S here

# --- the receiver -----------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    answered: int | None = None


@dataclass
class Receiver:
    port: int
    requests: list[Received] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)  # path -> endpoint secret
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def verified(self, path: str) -> list[dict[str, Any]]:
        """The bodies sent to `path`, each signature checked with the endpoint's secret."""
        return [
            Webhook(self.secrets[path]).verify(r.body, r.headers) for r in self.on(path)
        ]

    def wait(self, path: str, count: int, timeout: float = 30) -> list[Received]:
        infra.wait_for(lambda: len(self.on(path)) >= count, timeout, f"{count} request(s) on {path}")
        return self.on(path)


def _handler(receiver: Receiver):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            path = self.path.split("?")[0]
            entry = Received(path, dict(self.headers.items()), body, time.monotonic())
            with receiver.lock:
                receiver.requests.append(entry)
                earlier = sum(1 for r in receiver.requests if r.path == path) - 1
            if path == "/hang":
                receiver.release.wait(60)
                return
            if path == "/drip":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                while not receiver.release.wait(0.3):
                    try:
                        self.wfile.write(b"X")
                        self.wfile.flush()
                    except OSError:
                        return
                return
            status = {"/flaky": 500 if earlier == 0 else 200, "/redirect": 302, "/fail": 503}
            entry.answered = status.get(path, 204)
            self.send_response(entry.answered)
            if path == "/redirect":
                self.send_header("Location", receiver.url("/ok"))
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state = Receiver(infra.free_port())
    server = ThreadingHTTPServer(("127.0.0.1", state.port), _handler(state))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()


# --- the services ------------------------------------------------------------------------

WEBHOOK_ENV = {
    "TANDEM_WEBHOOK_ALLOWED_CIDRS": "127.0.0.1/32",
    "TANDEM_WEBHOOK_TIMEOUT_S": str(TIMEOUT_S),
    "TANDEM_WEBHOOK_CONNECT_TIMEOUT_S": "1",
    "TANDEM_WEBHOOK_BACKOFF_S": "0.3",
    "TANDEM_WEBHOOK_BACKOFF_MAX_S": "1",
    "TANDEM_WEBHOOK_RETRY_FOR_S": "6",
    "TANDEM_FEED_INTERVAL_S": "0.2",
}


@pytest.fixture(scope="module")
def settings(in_process_settings):
    return in_process_settings.model_copy(
        update={"webhook_allowed_cidrs": "127.0.0.1/32", "webhook_connect_timeout_s": 1.0}
    )


@pytest.fixture(scope="module")
def client(settings) -> FlaskClient:
    from services.api import create_app

    return create_app(settings, enqueue=lambda tasks: None).test_client()


@pytest.fixture(scope="module")
def services(service_env, redis_url, database_url, tmp_path_factory) -> Iterator[infra.Processes]:
    """A webhooks worker with ONE thread (so a stuck delivery would block the next) and the
    reconciler, which dispatches due deliveries."""
    processes = infra.Processes({**service_env, **WEBHOOK_ENV}, tmp_path_factory.mktemp("logs"))
    try:
        processes.worker("webhooks", concurrency=1)
        processes.start("reconciler", [str(infra.BIN / "tandem"), "reconcile", "--interval", "1"])
        yield processes
    finally:
        processes.stop_all()
        _forget_webhooks(database_url, redis_url)


def _forget_webhooks(database_url: str, redis_url: str) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM webhook_endpoints"))
        connection.execute(text("DELETE FROM webhook_events"))
    engine.dispose()
    client = redis.Redis.from_url(redis_url)
    client.delete("webhooks")
    client.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def problem(response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    assert fragment in response.get_json()["detail"], response.get_json()["detail"]


def subscribe(client: FlaskClient, key: str, receiver: Receiver, path: str, events: list[str]) -> dict:
    response = client.post(
        "/v1/webhook_endpoints", json={"url": receiver.url(path), "events": events}, headers=auth(key)
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    endpoint = response.get_json()
    receiver.secrets[path] = endpoint["secret"]
    return endpoint


def queued_job(client: FlaskClient, key: str) -> str:
    response = client.post("/v1/jobs", json={"question": QUESTION}, headers=auth(key))
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()["id"]


def cancel(client: FlaskClient, key: str, job_id: str) -> None:
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).get_json()["status"] == "cancelled"


def deliveries(client: FlaskClient, key: str, endpoint_id: str, **query) -> list[dict]:
    response = client.get(
        f"/v1/webhook_endpoints/{endpoint_id}/deliveries", query_string=query, headers=auth(key)
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["data"]


def wait_delivery(client, key, endpoint_id, until, timeout: float = 30) -> dict:
    found: dict = {}

    def check() -> bool:
        rows = deliveries(client, key, endpoint_id)
        if rows and until(rows[0]):
            found.update(rows[0])
            return True
        return False

    infra.wait_for(check, timeout, "the delivery", interval=0.2)
    return found


def count(database_url: str, sql: str, **params) -> int:
    from sqlalchemy import create_engine

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text(sql), params).scalar_one())
    finally:
        engine.dispose()


# --- signing, backoff, addresses (no services) -------------------------------------------


def test_signature_is_the_standard_one() -> None:
    """The headers verify with the reference library, and the signature is exactly the
    spec's HMAC computed by hand (so signing and verifying are not merely the same code)."""
    from services.webhooks import signing

    secret = signing.new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    body = json.dumps({"type": "job.succeeded", "data": {"id": "job_1"}})
    headers = signing.headers(secret, "evt_1", body)
    assert Webhook(secret).verify(body, headers) == json.loads(body)
    expected = hmac.new(
        base64.b64decode(secret[6:]),
        f"evt_1.{headers['webhook-timestamp']}.{body}".encode(),
        hashlib.sha256,
    ).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(expected).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(body, headers)  # another endpoint's secret
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace("job_1", "job_2"), headers)  # a changed body


def test_backoff_doubles_with_jitter_and_spans_about_a_day(in_process_settings) -> None:
    from services.webhooks.delivery import backoff_s

    settings = in_process_settings.model_copy(
        update={"webhook_backoff_s": 5.0, "webhook_backoff_max_s": 10_800.0}
    )
    rng = random.Random(7)
    delays = [backoff_s(n, settings, rng) for n in range(1, 40)]
    for n, delay in enumerate(delays, start=1):
        nominal = min(5.0 * 2 ** (n - 1), 10_800.0)
        assert 0.75 * nominal <= delay <= 1.25 * nominal
    assert len({round(d, 6) for d in delays[-10:]}) == 10  # jittered, not in lockstep
    # How many attempts a day of retrying makes with the defaults: about twenty.
    elapsed, attempts = 0.0, 1
    while elapsed + (delay := backoff_s(attempts, settings, rng)) <= 86_400:
        elapsed += delay
        attempts += 1
    assert 12 <= attempts <= 25, attempts


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("93.184.215.14", None),
        ("2606:4700::1111", None),
        ("::ffff:93.184.215.14", None),
        ("64:ff9b::5db8:d70e", None),  # NAT64 of a public address
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.0.10", "private"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("2002:a00:1::1", "private"),  # 6to4 of 10.0.0.1
        ("169.254.10.10", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("100.64.0.1", "CGNAT"),
        ("fd12:3456::1", "private"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
    ],
)
def test_address_policy(address: str, refused: str | None) -> None:
    import ipaddress

    from services.webhooks.addresses import Policy

    reason = Policy().refusal(address)
    assert (reason is None) if refused is None else (refused in (reason or "")), reason
    lenient = Policy(allow_private=True).refusal(address)
    if refused in ("metadata", "unspecified", "multicast", "reserved"):
        assert lenient is not None  # allow_private does not open these
    else:
        assert lenient is None
    allowed = Policy(allowed=(ipaddress.ip_network(address.split("%")[0]),))
    assert allowed.refusal(address) is None  # an explicit allow-list entry does


# --- the API ---------------------------------------------------------------------------------


def test_create_list_get_delete_and_the_secret_is_shown_once(
    client: FlaskClient, api_key: str, receiver: Receiver
) -> None:
    endpoint = subscribe(client, api_key, receiver, "/crud", ["job.succeeded", "batch.completed"])
    assert endpoint["object"] == "webhook_endpoint" and endpoint["secret"].startswith("whsec_")
    assert endpoint["events"] == ["job.succeeded", "batch.completed"]
    read = client.get(f"/v1/webhook_endpoints/{endpoint['id']}", headers=auth(api_key)).get_json()
    assert read["url"] == receiver.url("/crud") and "secret" not in read
    listed = client.get("/v1/webhook_endpoints", headers=auth(api_key)).get_json()["data"]
    assert endpoint["id"] in {e["id"] for e in listed} and all("secret" not in e for e in listed)
    problem(
        client.post(
            "/v1/webhook_endpoints",
            json={"url": receiver.url("/crud"), "events": ["job.failed"]},
            headers=auth(api_key),
        ),
        409,
        "exists already",
    )
    gone = client.delete(f"/v1/webhook_endpoints/{endpoint['id']}", headers=auth(api_key))
    assert gone.status_code == 200 and gone.get_json()["deleted"] is True
    problem(client.get(f"/v1/webhook_endpoints/{endpoint['id']}", headers=auth(api_key)), 404, "no webhook")


def test_owner_isolation(client: FlaskClient, api_key: str, other_key: str, receiver: Receiver) -> None:
    endpoint = subscribe(client, api_key, receiver, "/mine", ["job.cancelled"])
    base = f"/v1/webhook_endpoints/{endpoint['id']}"
    for response in (
        client.get(base, headers=auth(other_key)),
        client.delete(base, headers=auth(other_key)),
        client.get(base + "/deliveries", headers=auth(other_key)),
    ):
        problem(response, 404, "no webhook endpoint")
    theirs = client.get("/v1/webhook_endpoints", headers=auth(other_key)).get_json()["data"]
    assert endpoint["id"] not in {e["id"] for e in theirs}
    assert client.get(base, headers=auth(api_key)).status_code == 200
    client.delete(base, headers=auth(api_key))


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"url": "http://10.0.0.7/hook", "events": ["job.failed"]}, 422, "private"),
        ({"url": "http://169.254.169.254/latest/meta-data/", "events": ["job.failed"]}, 422, "metadata"),
        ({"url": "http://[::1]:8080/", "events": ["job.failed"]}, 422, "loopback"),
        ({"url": "http://[::ffff:127.0.0.1]/", "events": ["job.failed"]}, 422, "loopback"),
        ({"url": "http://100.64.3.4/", "events": ["job.failed"]}, 422, "CGNAT"),
        ({"url": "http://0.0.0.0:80/", "events": ["job.failed"]}, 422, "unspecified"),
        ({"url": "https://[fe80::1]/", "events": ["job.failed"]}, 422, "link-local"),
        ({"url": "http://localhost:9/", "events": ["job.failed"]}, 422, "loopback"),
        ({"url": "ftp://example.com/", "events": ["job.failed"]}, 422, "https://"),
        ({"url": "https://user:pw@example.com/", "events": ["job.failed"]}, 422, "credentials"),
        ({"url": "https://example.com/#x", "events": ["job.failed"]}, 422, "fragment"),
        ({"url": "https:///nohost", "events": ["job.failed"]}, 422, "no host"),
        ({"url": "https://example.com:99999/", "events": ["job.failed"]}, 422, "valid URL"),
        ({"url": "https://ex ample.com/", "events": ["job.failed"]}, 422, "spaces"),
        ({"url": "https://example.com/" + "a" * 2100, "events": ["job.failed"]}, 422, "longer"),
        ({"url": "https://nonexistent.invalid/", "events": ["job.failed"]}, 422, "resolve"),
        ({"url": 7, "events": ["job.failed"]}, 422, "url"),
        ({"events": ["job.failed"]}, 422, "url"),
        ({"url": "https://example.com/", "events": []}, 422, "non-empty list"),
        ({"url": "https://example.com/", "events": "job.failed"}, 422, "list"),
        ({"url": "https://example.com/", "events": ["job.exploded"]}, 422, "unknown event"),
        ({"url": "https://example.com/", "events": ["job.failed"], "x": 1}, 422, "unknown field"),
        (["not", "an", "object"], 422, "JSON object"),
    ],
)
def test_bad_endpoints_get_a_clear_4xx(
    in_process_settings, api_key: str, body: Any, status: int, fragment: str
) -> None:
    """Without any allowance (the service's defaults): only public addresses."""
    from services.api import create_app

    client = create_app(in_process_settings, enqueue=lambda tasks: None).test_client()
    problem(client.post("/v1/webhook_endpoints", json=body, headers=auth(api_key)), status, fragment)


def test_metadata_stays_refused_with_allow_private(in_process_settings, api_key: str) -> None:
    from services.api import create_app

    lenient = in_process_settings.model_copy(update={"webhook_allow_private": True})
    client = create_app(lenient, enqueue=lambda tasks: None).test_client()
    body = {"url": "http://169.254.169.254/", "events": ["job.failed"]}
    problem(client.post("/v1/webhook_endpoints", json=body, headers=auth(api_key)), 422, "metadata")
    body = {"url": "http://10.0.0.7/", "events": ["job.failed"]}
    response = client.post("/v1/webhook_endpoints", json=body, headers=auth(api_key))
    assert response.status_code == 201
    client.delete(f"/v1/webhook_endpoints/{response.get_json()['id']}", headers=auth(api_key))


def test_bodies_content_types_and_queries(client: FlaskClient, api_key: str) -> None:
    problem(client.post("/v1/webhook_endpoints", data="url=x", headers=auth(api_key)), 415, "JSON")
    problem(
        client.post(
            "/v1/webhook_endpoints",
            data="{nope",
            content_type="application/json",
            headers=auth(api_key),
        ),
        400,
        "malformed",
    )
    big = json.dumps({"url": "https://example.com/", "events": ["job.failed"], "pad": "x" * 20000})
    problem(
        client.post(
            "/v1/webhook_endpoints", data=big, content_type="application/json", headers=auth(api_key)
        ),
        413,
        "limited",
    )
    problem(client.get("/v1/webhook_endpoints", headers=auth("tdm_x")), 401, "invalid")
    problem(client.get("/v1/webhook_endpoints/we_nope/deliveries", headers=auth(api_key)), 404, "no webhook")
    problem(client.get("/v1/webhook_endpoints?sort=1", headers=auth(api_key)), 400, "unknown query")


def test_no_endpoint_no_event_and_only_subscribed_types(
    client: FlaskClient, api_key: str, other_key: str, receiver: Receiver, database_url: str
) -> None:
    """Events are never invented: an owner without an endpoint gets no rows at all, a type
    nobody subscribes to is not written, and a rolled-back change leaves no event."""
    from services.core.steps import Outcome
    from services.storage import job_rows
    from services.storage.db import transaction

    before = count(database_url, "SELECT count(*) FROM webhook_events")
    theirs = queued_job(client, other_key)  # mallory has no endpoint
    cancel(client, other_key, theirs)
    endpoint = subscribe(client, api_key, receiver, "/failed-only", ["job.failed"])
    mine = queued_job(client, api_key)
    cancel(client, api_key, mine)  # cancelled, not failed
    assert count(database_url, "SELECT count(*) FROM webhook_events") == before
    rolled_back = queued_job(client, api_key)
    with pytest.raises(RuntimeError), transaction(database_url) as session:
        assert job_rows.mark_failed(session, rolled_back, "boom")
        raise RuntimeError("the transaction of the change aborts")
    assert count(database_url, "SELECT count(*) FROM webhook_events") == before
    with transaction(database_url) as session:
        assert job_rows.mark_succeeded(session, rolled_back, Outcome("7", "7", {})) is True
        assert job_rows.mark_failed(session, rolled_back, "too late") is False  # already final
    assert count(database_url, "SELECT count(*) FROM webhook_events") == before
    failing = queued_job(client, api_key)
    with transaction(database_url) as session:
        assert job_rows.mark_failed(session, failing, "boom")
    assert count(
        database_url,
        "SELECT count(*) FROM webhook_events WHERE type = 'job.failed' AND object_id = :id",
        id=failing,
    ) == 1
    client.delete(f"/v1/webhook_endpoints/{endpoint['id']}", headers=auth(api_key))


# --- checked at delivery time, connected to the checked address ---------------------------------


def _one_delivery(client, key, receiver, path, settings) -> tuple[str, str, int]:
    """An endpoint, one event for it, and its delivery dispatched by the dispatcher to a
    list instead of the queue: the test attempts it itself (these tests run before the
    module starts a webhooks worker and a reconciler)."""
    from services.webhooks.dispatch import dispatch

    endpoint = subscribe(client, key, receiver, path, ["job.cancelled"])
    cancel(client, key, queued_job(client, key))
    sent: list[tuple[str, int]] = []
    assert dispatch(settings, sent.extend) == 1
    return endpoint["id"], *sent[0]


def test_checked_again_at_delivery_time(
    client: FlaskClient, settings, api_key: str, receiver: Receiver, database_url: str
) -> None:
    """An endpoint accepted while 127.0.0.1 was allowed is refused once it is not: the check
    runs before every attempt, and nothing is sent."""
    from services.webhooks.delivery import attempt

    endpoint_id, delivery_id, dispatch = _one_delivery(
        client, api_key, receiver, "/later-refused", settings
    )
    strict = settings.model_copy(update={"webhook_allowed_cidrs": ""})
    assert attempt(strict, delivery_id, dispatch) == "pending"
    row = deliveries(client, api_key, endpoint_id)[0]
    assert row["history"][0]["error"].startswith("refused:") and "loopback" in row["last_error"]
    assert receiver.on("/later-refused") == []
    # Another dispatch's message (an older copy redelivered) may not attempt it.
    assert attempt(settings, delivery_id, dispatch - 1) is None
    client.delete(f"/v1/webhook_endpoints/{endpoint_id}", headers=auth(api_key))


def test_one_lookup_and_the_connection_goes_to_the_checked_address(
    client: FlaskClient, settings, api_key: str, receiver: Receiver, database_url: str
) -> None:
    """A host name whose DNS answers 127.0.0.1 first and 10.0.0.1 afterwards (a rebinding
    attack): the attempt resolves it once, checks that answer and connects to it; the HTTP
    stack never resolves the name again (here it could not: the name is not in any DNS),
    and the request still names the host."""
    from services.storage.db import transaction
    from services.storage.models import WebhookEndpoint
    from services.webhooks.delivery import attempt

    endpoint_id, delivery_id, dispatch = _one_delivery(client, api_key, receiver, "/pinned", settings)
    with transaction(database_url) as session:
        session.get_one(WebhookEndpoint, endpoint_id).url = receiver.url("/pinned", "rebind.test")
    lookups: list[str] = []

    def rebinding_dns(host, port, **_kwargs):
        lookups.append(host)
        address = "127.0.0.1" if len(lookups) == 1 else "10.0.0.1"
        return [(2, 1, 6, "", (address, port))]

    assert attempt(settings, delivery_id, dispatch, resolver=rebinding_dns) == "delivered"
    assert lookups == ["rebind.test"]
    request = receiver.on("/pinned")[0]
    assert request.headers["Host"] == f"rebind.test:{receiver.port}"
    assert receiver.verified("/pinned")[0]["type"] == "job.cancelled"
    client.delete(f"/v1/webhook_endpoints/{endpoint_id}", headers=auth(api_key))


def test_deleting_an_endpoint_drops_its_pending_deliveries(
    client: FlaskClient, settings, api_key: str, receiver: Receiver, database_url: str
) -> None:
    from services.webhooks.delivery import attempt

    endpoint_id, delivery_id, dispatch = _one_delivery(client, api_key, receiver, "/deleted", settings)
    client.delete(f"/v1/webhook_endpoints/{endpoint_id}", headers=auth(api_key))
    assert attempt(settings, delivery_id, dispatch) is None
    assert receiver.on("/deleted") == []
    assert count(database_url, "SELECT count(*) FROM webhook_deliveries WHERE id = :id", id=delivery_id) == 0


# --- delivery through the worker ---------------------------------------------------------------


def test_retried_after_500_and_accepted_exactly_once(
    services, client: FlaskClient, api_key: str, receiver: Receiver
) -> None:
    endpoint = subscribe(client, api_key, receiver, "/flaky", ["job.cancelled"])
    job_id = queued_job(client, api_key)
    cancel(client, api_key, job_id)
    delivery = wait_delivery(client, api_key, endpoint["id"], lambda d: d["status"] != "pending")
    assert delivery["status"] == "delivered" and delivery["attempts"] == 2
    assert [a["status_code"] for a in delivery["history"]] == [500, 200]
    assert delivery["history"][0]["error"].startswith("HTTP 500")
    time.sleep(3)  # nothing more comes
    seen = receiver.on("/flaky")
    assert [r.answered for r in seen] == [500, 200]
    bodies = receiver.verified("/flaky")
    assert {r.headers["webhook-id"] for r in seen} == {delivery["event"]["id"]}  # one message id
    assert bodies[0] == bodies[1]
    assert bodies[1]["type"] == "job.cancelled"
    assert bodies[1]["data"] == {
        "object": "job",
        "id": job_id,
        "status": "cancelled",
        "url": f"/v1/jobs/{job_id}",
    }
    client.delete(f"/v1/webhook_endpoints/{endpoint['id']}", headers=auth(api_key))


def test_a_receiver_that_never_answers_does_not_hold_the_worker(
    services, client: FlaskClient, api_key: str, receiver: Receiver
) -> None:
    """The worker has one thread. A receiver that never answers, then one that answers a
    byte every 0.3 s, each hold it for the timeout and no longer: an event for a good
    receiver sent while the dripping one holds the thread arrives right after."""
    hang = subscribe(client, api_key, receiver, "/hang", ["job.cancelled"])
    cancel(client, api_key, queued_job(client, api_key))
    hung = receiver.wait("/hang", 1)[0]
    client.delete(f"/v1/webhook_endpoints/{hang['id']}", headers=auth(api_key))  # no retries
    drip = subscribe(client, api_key, receiver, "/drip", ["job.cancelled"])
    cancel(client, api_key, queued_job(client, api_key))
    dripping = receiver.wait("/drip", 1)[0]
    assert dripping.at - hung.at < TIMEOUT_S + 3  # the hung attempt gave the thread back
    ok = subscribe(client, api_key, receiver, "/ok", ["job.cancelled"])
    cancel(client, api_key, queued_job(client, api_key))
    good = receiver.wait("/ok", 1)[0]
    # The drip's attempt ends at the timeout; its retry may take the thread once more first.
    assert good.at - dripping.at < 2 * TIMEOUT_S + 3, good.at - dripping.at
    stuck = wait_delivery(client, api_key, drip["id"], lambda d: d["attempts"] >= 1)
    entry = stuck["history"][0]
    assert entry["status_code"] is None and "within" in entry["error"], entry
    assert TIMEOUT_S * 1000 * 0.9 <= entry["duration_ms"] <= TIMEOUT_S * 1000 + 800, entry
    assert receiver.verified("/ok")[0]["type"] == "job.cancelled"
    for endpoint in (drip, ok):
        client.delete(f"/v1/webhook_endpoints/{endpoint['id']}", headers=auth(api_key))


def test_redirects_are_not_followed_and_retries_end_in_failed(
    services, client: FlaskClient, api_key: str, receiver: Receiver
) -> None:
    endpoint = subscribe(client, api_key, receiver, "/redirect", ["job.cancelled"])
    before_ok = len(receiver.on("/ok"))
    cancel(client, api_key, queued_job(client, api_key))
    # TANDEM_WEBHOOK_RETRY_FOR_S=6 here: retried with backoff, then failed.
    delivery = wait_delivery(client, api_key, endpoint["id"], lambda d: d["status"] != "pending", 40)
    assert delivery["status"] == "failed" and delivery["attempts"] >= 3
    assert {a["status_code"] for a in delivery["history"]} == {302}
    assert delivery["finished_at"] and delivery["next_attempt_at"] is None
    assert len(receiver.on("/ok")) == before_ok  # the Location was never requested
    assert len(receiver.on("/redirect")) == delivery["attempts"]
    listed = deliveries(client, api_key, endpoint["id"], status="failed")
    assert [d["id"] for d in listed] == [delivery["id"]]
    assert deliveries(client, api_key, endpoint["id"], status="delivered") == []
    client.delete(f"/v1/webhook_endpoints/{endpoint['id']}", headers=auth(api_key))


def test_deliveries_are_listed_newest_first_with_cursor_pages(
    services, client: FlaskClient, api_key: str, receiver: Receiver
) -> None:
    endpoint = subscribe(client, api_key, receiver, "/ok-pages", ["job.cancelled"])
    jobs = [queued_job(client, api_key) for _ in range(3)]
    for job_id in jobs:
        cancel(client, api_key, job_id)
    infra.wait_for(
        lambda: len(deliveries(client, api_key, endpoint["id"], status="delivered")) == 3, 30, "3"
    )
    first = client.get(
        f"/v1/webhook_endpoints/{endpoint['id']}/deliveries?limit=2", headers=auth(api_key)
    ).get_json()
    assert len(first["data"]) == 2 and first["has_more"]
    rest = client.get(
        f"/v1/webhook_endpoints/{endpoint['id']}/deliveries?limit=2&cursor={first['next_cursor']}",
        headers=auth(api_key),
    ).get_json()
    assert len(rest["data"]) == 1 and not rest["has_more"]
    objects = [d["event"]["object_id"] for d in first["data"] + rest["data"]]
    assert objects == list(reversed(jobs))
    assert all(d["attempts"] == 1 and d["last_status_code"] == 204 for d in first["data"])
    problem(
        client.get(f"/v1/webhook_endpoints/{endpoint['id']}/deliveries?status=x", headers=auth(api_key)),
        400,
        "status",
    )
    client.delete(f"/v1/webhook_endpoints/{endpoint['id']}", headers=auth(api_key))


# --- end to end, with the model ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.model
def test_job_succeeded_and_batch_completed_are_delivered_once_and_verify(
    services, service_env, client: FlaskClient, api_key: str, other_key: str, receiver: Receiver,
    tmp_path: Path,
) -> None:
    """Real jobs on a real executor worker (slm_only, 4 tokens) through the API process:
    alice's endpoint gets exactly one signed job.succeeded and one batch.completed; mallory's
    endpoint, subscribed to the same types, gets nothing of alice's."""
    import httpx

    endpoint = subscribe(client, api_key, receiver, "/e2e", ["job.succeeded", "batch.completed"])
    theirs = subscribe(client, other_key, receiver, "/e2e-mallory", ["job.succeeded", "batch.completed"])
    processes = infra.Processes({**service_env, **WEBHOOK_ENV}, tmp_path)
    port = infra.free_port()
    try:
        processes.worker("executor", concurrency=2)
        processes.api(port)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth(api_key), timeout=30)
        params = {"budgets": [0], "executor_max_tokens": 4}
        job = http.post("/v1/jobs", json={"question": QUESTION, "strategy": "slm_only", "params": params}).json()
        lines = "".join(
            json.dumps({"custom_id": f"l{i}", "question": QUESTION, "params": params}) + "\n"
            for i in range(2)
        )
        batch = http.post(
            "/v1/batches?strategy=slm_only", content=lines, headers={"Content-Type": "application/jsonl"}
        ).json()
        receiver.wait("/e2e", 2, timeout=240)
        time.sleep(3)  # nothing else comes
        bodies = receiver.verified("/e2e")
        assert sorted(b["type"] for b in bodies) == ["batch.completed", "job.succeeded"]
        by_type = {b["type"]: b for b in bodies}
        assert by_type["job.succeeded"]["data"]["id"] == job["id"]
        assert by_type["batch.completed"]["data"]["id"] == batch["id"]
        assert http.get(by_type["job.succeeded"]["data"]["url"]).json()["status"] == "succeeded"
        assert http.get(by_type["batch.completed"]["data"]["url"]).json()["status"] == "completed"
        assert len({r.headers["webhook-id"] for r in receiver.on("/e2e")}) == 2
        assert receiver.on("/e2e-mallory") == []
    finally:
        processes.stop_all()
        for e, key in ((endpoint, api_key), (theirs, other_key)):
            client.delete(f"/v1/webhook_endpoints/{e['id']}", headers=auth(key))
