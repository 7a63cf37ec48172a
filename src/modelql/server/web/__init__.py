"""The web UI of `modelql serve`: `GET /` (the page) and `GET /ui/{file}` (its script, style and
the charts shared with the CLI's HTML files), all shipped in the package — no CDN, no build step.

The page is plain HTML + vanilla JS + inline SVG. It is public (a browser cannot send a bearer
token on navigation); everything it shows comes from the authenticated API, with the key typed
once into the page (kept in the tab's sessionStorage). `api.router` holds the routes the page
needs beyond the knowledge group (trace, explain, feature pages, LQL, the patch directory).
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

from ..body import JsonRoute
from ..errors import HttpError

router = APIRouter(route_class=JsonRoute, tags=["web"], include_in_schema=False)

#: file name → (package, media type)
ASSETS = {
    "app.js": ("modelql.server.web", "text/javascript; charset=utf-8"),
    "style.css": ("modelql.server.web", "text/css; charset=utf-8"),
    "charts.js": ("modelql.viz", "text/javascript; charset=utf-8"),
}
PAGE = "index.html"
#: what the edge serves without the key (the page asks for it; a browser cannot send it on navigation)
PUBLIC_PATHS = frozenset({"/"} | {f"/ui/{name}" for name in ASSETS})
#: the security headers of every UI response: nothing loads from elsewhere, no framing
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def asset_bytes(name: str) -> bytes:
    """The bytes of a shipped asset (`index.html` or one of `ASSETS`)."""
    package = "modelql.server.web" if name == PAGE else ASSETS[name][0]
    return resources.files(package).joinpath("static", name).read_bytes()


def served_assets() -> dict[str, bytes]:
    """Every file the UI serves, by URL path (for the no-external-URL test)."""
    out = {"/": asset_bytes(PAGE)}
    out.update({f"/ui/{n}": asset_bytes(n) for n in ASSETS})
    return out


@router.get("/")
async def page():
    return Response(asset_bytes(PAGE), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/ui/{name}")
async def asset(name: str):
    if name not in ASSETS:
        raise HttpError(404, f"no such UI file: {name}")
    return Response(asset_bytes(name), media_type=ASSETS[name][1], headers=HEADERS)


def routers() -> list[APIRouter]:
    """The page router and the API routes it uses (for `create_app(knowledge=...)`)."""
    from . import api

    return [router, api.router]
