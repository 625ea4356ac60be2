"""``/console``: the operator console's built files (React, console/ in the repo),
shipped inside the package in ``proxy/console_dist`` so no Node is needed to run it.
Paths without a file are the single-page app's own routes: they get ``index.html``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from aiohttp import web

DIST = Path(str(resources.files("proxy") / "console_dist"))
_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}
# Built file names carry a content hash: they never change, so they may be cached for good.
_FOREVER = "public, max-age=31536000, immutable"
# The app loads only its own files and talks only to its own origin (Recharts sets
# inline style attributes, hence 'unsafe-inline' for styles alone); no framing.
_POLICY = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "frame-ancestors 'none'"
)


def add_routes(app: web.Application) -> None:
    """``/console/…``: the files found in ``DIST`` now (listed once, not per request)."""
    built = {path.relative_to(DIST).as_posix(): path for path in DIST.rglob("*") if path.is_file()}
    app.router.add_get("/console", _redirect)

    async def files(request: web.Request) -> web.StreamResponse:
        return await serve(request, built)

    app.router.add_get("/console/{path:.*}", files)


async def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/console/")


async def serve(request: web.Request, built: dict[str, Path]) -> web.StreamResponse:
    """A built file (only those: a path is a dict key, never joined onto a folder), or
    the app's ``index.html`` for its client-side routes."""
    wanted = request.match_info["path"]
    found = built.get(wanted) if wanted != "index.html" else None
    if found is not None:
        return _file(found, _FOREVER if wanted.startswith("assets/") else "no-cache")
    index = built.get("index.html")
    if index is None:
        return web.Response(
            status=503, text="The console is not built: run `npm ci && npm run build` in console/."
        )
    return _file(index, "no-cache")


def _file(path: Path, cache: str) -> web.FileResponse:
    headers = {
        "Cache-Control": cache,
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": _POLICY,
    }
    kind = _TYPES.get(path.suffix)
    if kind:
        headers["Content-Type"] = kind
    return web.FileResponse(path, headers=headers)
