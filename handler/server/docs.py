"""`/docs`: Swagger UI over `/openapi.json`, as TGI and vLLM serve it.

The container may have no internet, so nothing comes from a CDN: the page is ours, and its
script and stylesheet are the Swagger UI dist files that the pinned `flask-swagger-ui` wheel
ships (only those files: the package's own blueprint and template are not used). The app has no
static folder on purpose, and no route here takes a file name from the request: each file of
`ASSETS` has a route of its own.

The page and its files are public, like TGI's `/docs`: they are the same for every caller and
say nothing about the model or the server. `/openapi.json` keeps its place behind the API key;
when it answers 401, the page asks for the key and sends it with every request it makes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import flask_swagger_ui
from flask import Flask, Response, send_file

DIST = Path(flask_swagger_ui.__file__).parent / "dist"
"""Swagger UI's dist files as the wheel installs them."""
ASSETS = {
    "/docs/swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript"),
    "/docs/swagger-ui.css": ("swagger-ui.css", "text/css"),
}
"""Route -> (file in `DIST`, content type): everything the page loads besides the document."""
PUBLIC_PATHS = frozenset({"/docs", *ASSETS})
"""Reachable without the API key."""
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:"
)
"""The browser loads and calls nothing but this server (the inline script is the page's own)."""

# Relative URLs, so that the page also works behind a proxy that serves the API under a prefix.
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>hf-neuron-serving API</title>
  <link rel="stylesheet" href="docs/swagger-ui.css">
  <style>
    body { margin: 0; background: #fafafa; }
    #api-key { max-width: 1420px; margin: 20px auto; padding: 0 20px; font-family: sans-serif; }
  </style>
</head>
<body>
  <form id="api-key" hidden>
    <p>This server was started with an API key: <code>/openapi.json</code> answered 401.</p>
    <label>API key <input name="key" type="password" autocomplete="off"></label>
    <button type="submit">Load</button>
  </form>
  <div id="swagger-ui"></div>
  <script src="docs/swagger-ui-bundle.js"></script>
  <script>
    const form = document.getElementById("api-key");
    let key = "";

    function authorize(request) {
      if (key && !request.headers.Authorization) {
        request.headers.Authorization = "Bearer " + key;
      }
      return request;
    }

    async function show() {
      const probe = await fetch("openapi.json", authorize({headers: {}}));
      form.hidden = probe.status !== 401;
      if (!form.hidden) {
        return;
      }
      window.ui = SwaggerUIBundle({
        url: "openapi.json",
        dom_id: "#swagger-ui",
        deepLinking: true,
        validatorUrl: null,  // the default badge would call validator.swagger.io
        requestInterceptor: authorize,
      });
    }

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      key = form.elements.key.value;
      show();
    });
    show();
  </script>
</body>
</html>
"""


def register_docs(app: Flask) -> None:
    """Add `GET /docs` and the files it loads to `app`."""

    @app.get("/docs")
    def docs_route() -> Response:
        return Response(
            PAGE, mimetype="text/html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY}
        )

    for path, (name, mimetype) in ASSETS.items():
        app.add_url_rule(path, f"docs_{Path(name).stem}", _asset_view(DIST / name, mimetype))


def _asset_view(file: Path, mimetype: str) -> Callable[[], Response]:
    """A view that sends `file`, fixed when its route is added."""

    def asset() -> Response:
        return send_file(file, mimetype=mimetype)

    return asset
