"""`/ui/`: the dashboard's static files, shipped inside the package (no build step, no CDN).

The files hold no fleet data, so they are served without a key (a browser cannot put
a bearer token on a page load); the page asks for the key and sends it on every
`fetch` to `/v2/dashboard` and `/v1/chat/completions`. Only the files named in
`FILES` exist — no path from the URL reaches the file system. Every answer carries a
strict Content-Security-Policy: scripts, styles and connections from the queen's own
origin only, no inline script or style, no framing.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from rbee_worker.protocol.errors import ErrorCode, RbeeError

PREFIX = "/ui"
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return resources.files(__package__ or "rbee_control.queen").joinpath("ui", name).read_bytes()


def _file(name: str) -> Response:
    media_type = FILES.get(name)
    if media_type is None:
        raise RbeeError(ErrorCode.NOT_FOUND, f"no dashboard file {name[:80]!r}", status=404)
    return Response(_read(name), media_type=media_type, headers=HEADERS)


async def index(request: Request) -> Response:
    return _file("index.html")


async def asset(request: Request) -> Response:
    return _file(request.path_params["name"])


async def to_index(request: Request) -> Response:
    return RedirectResponse(f"{PREFIX}/", status_code=308, headers=HEADERS)


ROUTES = [
    Route(PREFIX, to_index, methods=["GET"]),
    Route(f"{PREFIX}/", index, methods=["GET"]),
    Route(f"{PREFIX}/{{name}}", asset, methods=["GET"]),
]
