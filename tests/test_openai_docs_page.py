"""The API reference page (/docs) in a real browser: Swagger UI renders every route from
/openapi.json with nothing fetched from outside this server, and "Try it out" with a key
calls the API from the page."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BROWSER = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


@pytest.fixture(scope="module")
def base_url(in_process_settings) -> Iterator[str]:
    from werkzeug.serving import make_server

    from services.api import create_app

    app = create_app(in_process_settings, enqueue=lambda tasks: None)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def test_the_reference_renders_offline_and_calls_the_api(base_url: str, api_key: str, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(BROWSER):
        pytest.skip("no system Chromium (apt-get install chromium)")
    outside: list[str] = []
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=BROWSER, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            def guard(route) -> None:
                if route.request.url.startswith(base_url):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", guard)
            page.goto(f"{base_url}/docs")
            operations = page.locator(".opblock")
            sync_api.expect(operations.first).to_be_visible(timeout=30_000)
            text = page.locator("#swagger-ui").inner_text()
            for path in ("/v1/chat/completions", "/v1/files/{file_id}/content", "/v1/models", "/v1/jobs/{job_id}"):
                assert path in text, path
            assert operations.count() >= 20
            page.screenshot(path=os.environ.get("TANDEM_DOCS_SCREENSHOT", str(tmp_path / "docs.png")))
            # Authorize with a key, then "Try it out" on GET /v1/models.
            page.click("button.authorize")
            page.fill(".auth-container input", api_key)
            page.click(".auth-btn-wrapper button.authorize")
            page.click("button.btn-done")
            block = page.locator("#operations-OpenAI-get_models_v1_models_get, .opblock-get:has-text('/v1/models')").first
            block.locator(".opblock-summary").first.click()
            block.locator("button.try-out__btn").click()
            block.locator("button.execute").click()
            response = block.locator(".live-responses-table tbody .response-col_status").first
            sync_api.expect(response).to_have_text("200", timeout=15_000)
            assert "tandem@economy" in block.locator(".responses-wrapper").inner_text()
        finally:
            browser.close()
    assert outside == []  # the page needs nothing from the network
    assert errors == [], errors
