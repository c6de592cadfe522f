"""`/ui/`: the dashboards page, and `/ui/embed/<id>`: one shared dashboard, for an iframe.

Plain HTML and a small script of our own (`trace_query_api/ui/`), and the charting library:
Vega, Vega-Lite and vega-embed as the one self-contained bundle the `vl-convert-python` package
ships (`vl_convert.javascript_bundle()`, built once per process and kept in memory). Nothing is
loaded from another origin.

Content-Security-Policy: scripts from this origin only, no inline script, no eval (vega-embed
runs with `ast: true`, so Vega's expressions are interpreted by its bundled expression
interpreter instead of being compiled with `Function`), no inline style; connections to this
origin only. `/ui/` may not be framed (`frame-ancestors 'none'`, `X-Frame-Options: DENY`); the
embed page may be framed by `TRACE_QUERY_EMBED_FRAME_ANCESTORS` (default `*`). The org token is
kept in the page's sessionStorage and the embed token is read from the URL fragment
(`#token=...`), which browsers never send to a server: neither reaches a URL the server logs.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

__all__ = ["router", "page_csp", "vega_bundle"]

router = APIRouter(include_in_schema=False)

PAGES = Path(__file__).resolve().parents[2] / "ui"
_STATIC = {
    "app.js": "text/javascript",
    "app.css": "text/css",
}
_bundle_lock = threading.Lock()
# what the bundle's default snippet does: the libraries as globals for app.js
_GLOBALS = "window.vegaEmbed = vegaEmbed;\nwindow.vega = vega;\nwindow.vegaLite = vegaLite;\n"


def page_csp(frame_ancestors: str) -> str:
    return (
        "default-src 'none'; "
        "script-src 'self'; "
        "style-src 'self'; "
        # Vega draws SVG in the page; an exported image would be a data: URL
        "img-src 'self' data:; "
        "connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; object-src 'none'; "
        f"frame-ancestors {frame_ancestors}"
    )


_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def vega_bundle() -> bytes:
    """vega-embed with Vega-Lite and Vega, as one ES module that sets `window.vegaEmbed`
    (built once per process: about a second; concurrent first requests wait for it)."""
    with _bundle_lock:
        return _build_bundle()


@functools.cache
def _build_bundle() -> bytes:
    import vl_convert

    return str(vl_convert.javascript_bundle(_GLOBALS)).encode()


@functools.cache
def _page(name: str) -> bytes:
    return (PAGES / name).read_bytes()


@router.get("/ui")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308)


@router.get("/ui/")
def ui_page() -> HTMLResponse:
    headers = {
        **_HEADERS,
        "Content-Security-Policy": page_csp("'none'"),
        "X-Frame-Options": "DENY",
    }
    return HTMLResponse(_page("index.html"), headers=headers)


@router.get("/ui/embed/{embed_id}")
def ui_embed(embed_id: str, request: Request) -> HTMLResponse:
    ancestors = request.app.state.services.settings.query_embed_frame_ancestors
    headers = {**_HEADERS, "Content-Security-Policy": page_csp(ancestors)}
    return HTMLResponse(_page("embed.html"), headers=headers)


@router.get("/ui/static/{name}")
def ui_asset(name: str) -> Response:
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=3600"}
    if name == "vega.js":
        return Response(vega_bundle(), media_type="text/javascript", headers=headers)
    media_type = _STATIC.get(name)
    if media_type is None:
        raise HTTPException(404, f"no UI asset {name[:80]!r}")
    return Response(_page(name), media_type=media_type, headers=headers)
