"""`/docs`: Swagger UI over `/openapi.json`, from the bundled package, in a real browser.

With `requests`: the page and the two files it loads come from this server (no CDN: the
container may have no internet), byte for byte the files of the pinned `flask-swagger-ui`
wheel. With headless Chromium (Debian's `chromium`, which `make test` installs where it can):
the rendered page lists every operation of the document, and a screenshot of it is taken.
Without a chromium binary, the browser tests skip and say why.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests
from werkzeug.serving import make_server

from handler.config import read_settings
from handler.server.app import create_app
from handler.server.docs import DIST
from handler.server.metrics import Metrics
from handler.server.state import ServerState
from tests.conftest import RunningServer

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
HEADLESS = [
    "--headless",
    "--no-sandbox",  # root in CI containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIRTUAL_TIME_MS = 20_000
"""Virtual time the page gets to fetch the document and render it (network waits are free)."""
OPERATION_PATH = re.compile(r'class="opblock-summary-path"[^>]*data-path="([^"]+)"')
"""The path of one rendered operation, as Swagger UI 5 writes it into the DOM."""


class Sources(HTMLParser):
    """Every URL a page loads: script sources, stylesheets and other linked resources."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        url = named.get("src") if tag in ("script", "img", "iframe") else None
        if tag == "link":
            url = named.get("href")
        if url:
            self.urls.append(url)


@pytest.fixture(scope="module")
def chromium() -> str:
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        pytest.skip(
            "no chromium binary on PATH (looked for chromium, chromium-browser, google-chrome): "
            "install Debian's `chromium` with apt-get, as `make test` does when run as root"
        )
    return found


def render(chromium: str, url: str, profile: Path, *args: str) -> str:
    """Run headless Chromium on `url` with `args`; its stdout."""
    profile.mkdir()
    done = subprocess.run(
        [chromium, *HEADLESS, f"--user-data-dir={profile}", *args, url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def documented_paths(url: str, **headers: str) -> set[str]:
    return set(requests.get(f"{url}/openapi.json", headers=headers, timeout=10).json()["paths"])


@pytest.mark.slow
def test_the_page_and_its_files_come_from_this_server(server: RunningServer) -> None:
    page = requests.get(f"{server.url}/docs", timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert "http://" not in page.text and "https://" not in page.text
    parser = Sources()
    parser.feed(page.text)
    assert sorted(parser.urls) == ["docs/swagger-ui-bundle.js", "docs/swagger-ui.css"]
    types = {".js": "text/javascript", ".css": "text/css"}
    for source in parser.urls:
        answer = requests.get(urljoin(page.url, source), timeout=30)
        assert answer.status_code == 200, source
        assert answer.headers["Content-Type"].startswith(types[Path(source).suffix]), source
        assert answer.content == (DIST / Path(source).name).read_bytes(), source
    # Only the files the page needs: the rest of the package's directory is not served.
    for other in ("index.css", "swagger-ui.js", "../__init__.py", "VERSION"):
        assert requests.get(f"{server.url}/docs/{other}", timeout=10).status_code == 404, other


@pytest.mark.slow
def test_chromium_renders_every_operation_of_the_document(
    server: RunningServer, chromium: str, tmp_path: Path
) -> None:
    dom = render(
        chromium,
        f"{server.url}/docs",
        tmp_path / "profile",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        "--dump-dom",
    )
    assert "Failed to load API definition" not in dom
    rendered = set(OPERATION_PATH.findall(dom))
    assert {"/generate", "/v1/chat/completions", "/invocations", "/docs"} <= rendered
    assert rendered == documented_paths(server.url)


@pytest.mark.slow
def test_chromium_takes_a_screenshot_of_the_routes(
    server: RunningServer, chromium: str, tmp_path: Path
) -> None:
    screenshot = tmp_path / "docs.png"
    render(
        chromium,
        f"{server.url}/docs",
        tmp_path / "profile",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        f"--screenshot={screenshot}",
        "--window-size=1280,2000",
        "--hide-scrollbars",
    )
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk comes first
    assert (width, height) == (1280, 2000)
    # A blank page of that size compresses to a few kB; text and colored operations do not.
    assert len(png) > 60_000, len(png)


# --- with an API key ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_url() -> Iterator[str]:
    """The app with an API key and no model (the docs need none), on a local port."""
    app = create_app(ServerState(read_settings([], {"API_KEY": "docs-key"})), Metrics())
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_the_page_is_public_and_the_document_still_needs_the_key(guarded_url: str) -> None:
    for path in ("/docs", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"):
        assert requests.get(f"{guarded_url}{path}", timeout=30).status_code == 200, path
    refused = requests.get(f"{guarded_url}/openapi.json", timeout=10)
    assert refused.status_code == 401
    assert documented_paths(guarded_url, Authorization="Bearer docs-key") >= {"/docs"}


def test_with_an_api_key_chromium_shows_the_key_form(
    guarded_url: str, chromium: str, tmp_path: Path
) -> None:
    dom = render(
        chromium,
        f"{guarded_url}/docs",
        tmp_path / "profile",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        "--dump-dom",
    )
    form = re.search(r"<form id=\"api-key\"[^>]*>", dom)
    assert form is not None and "hidden" not in form.group(0), dom[:2000]
    assert not OPERATION_PATH.search(dom)
