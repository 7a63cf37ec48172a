"""`/docs` (Swagger UI) and `/redoc` from assets shipped in the package (`modelql/data/docs`), so the
pages render offline; FastAPI's defaults load them from a CDN. The versions and licences of the
vendored files are listed in `data/docs/README.md`."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

ASSETS = Path(__file__).resolve().parent.parent / "data" / "docs"
PREFIX = "/docs-assets"


def install(app: FastAPI) -> None:
    """Serve /docs, /redoc and their assets (create the app with `docs_url=None, redoc_url=None`)."""
    app.mount(PREFIX, StaticFiles(directory=ASSETS), name="docs-assets")
    title = app.title

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{title} - Swagger UI",
                                   swagger_js_url=f"{PREFIX}/swagger-ui/swagger-ui-bundle.js",
                                   swagger_css_url=f"{PREFIX}/swagger-ui/swagger-ui.css",
                                   swagger_favicon_url=f"{PREFIX}/swagger-ui/favicon-32x32.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{title} - ReDoc",
                              redoc_js_url=f"{PREFIX}/redoc/redoc.standalone.js",
                              redoc_favicon_url=f"{PREFIX}/swagger-ui/favicon-32x32.png", with_google_fonts=False)
