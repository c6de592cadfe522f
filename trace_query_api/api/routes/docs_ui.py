"""`/docs`: Swagger UI served from this service, not from a public CDN.

The assets come from the `swagger-ui-bundle-v2` package (its vendored `swagger-ui-dist`) and
only the three the page loads are served, under `/docs/static/`. The page carries a
Content-Security-Policy that allows this origin only: its one inline script (FastAPI's
initialiser of Swagger UI) is allowed by its SHA-256, nothing else inline. ReDoc is off (it
would load from a CDN).
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import swagger_ui_bundle
from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

__all__ = ["router", "docs_html"]

router = APIRouter(include_in_schema=False)

ASSETS = Path(str(swagger_ui_bundle.swagger_ui_path))
_SERVED = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def docs_html(root_path: str, openapi_url: str, title: str) -> tuple[bytes, str]:
    """The Swagger UI page and the Content-Security-Policy that lets it run."""
    static = f"{root_path}/docs/static"
    page = bytes(
        get_swagger_ui_html(
            openapi_url=f"{root_path}{openapi_url}",
            title=f"{title} - docs",
            swagger_js_url=f"{static}/swagger-ui-bundle.js",
            swagger_css_url=f"{static}/swagger-ui.css",
            swagger_favicon_url=f"{static}/favicon-32x32.png",
        ).body
    )
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(page.decode())
    )
    csp = (
        "default-src 'self'; "
        f"script-src 'self' {hashes}; "
        "style-src 'self'; "
        # Swagger UI's stylesheet draws its icons as data: SVGs
        "img-src 'self' data:; "
        "connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    return page, csp


@router.get("/docs")
def docs(request: Request) -> HTMLResponse:
    app = request.app
    page, csp = docs_html(request.scope.get("root_path", ""), app.openapi_url, app.title)
    return HTMLResponse(page, headers={"Content-Security-Policy": csp})


@router.get("/docs/static/{name}")
def docs_asset(name: str) -> FileResponse:
    media_type = _SERVED.get(name)
    if media_type is None:
        raise HTTPException(404, f"no docs asset {name[:80]!r}")
    return FileResponse(
        ASSETS / name,
        media_type=media_type,
        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )
