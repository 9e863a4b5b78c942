"""Real HTTP servers for download tests: a file server with Range and fault modes, and a fake HF hub.

Both are one Starlette app served by uvicorn on 127.0.0.1 in a thread of the test
process, so the hive (a separate process) downloads over a real socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 1 << 20


@dataclass
class Served:
    path: Path
    #: drop the connection half way through this many full (non-Range) GETs
    drop_first: int = 0
    #: answer this many requests with HTTP 500 first
    fail_first: int = 0
    #: no Content-Length (chunked), so only the disk can say when it is full
    chunked: bool = False
    #: a different sha256 than the real one, for the hub's ETag
    fake_sha256: str | None = None

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    range: str | None


class _Truncated(Response):
    """Headers promise the whole body; half is sent, then the connection just ends."""

    def __init__(self, path: Path, size: int) -> None:
        super().__init__(headers={"content-length": str(size), "accept-ranges": "bytes"})
        self._path, self._size = path, size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        with self._path.open("rb") as f:
            await send({"type": "http.response.body", "body": f.read(self._size // 2), "more_body": True})
        # returning without the final body message makes uvicorn close the connection


@dataclass
class FileServer:
    files: dict[str, Served] = field(default_factory=dict)
    #: repo id -> file names, for the fake hub
    repos: dict[str, list[str]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    #: `/redirect/{name}` answers 302 to this URL
    redirects: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, path: Path, **modes: object) -> str:
        self.files[name] = Served(path, **modes)  # type: ignore[arg-type]
        return f"{self.url}/files/{name}"

    def requests_for(self, name: str) -> list[Seen]:
        return [s for s in self.seen if s.path.endswith("/" + name)]

    # --- plain files ---------------------------------------------------------

    async def _serve(self, request: Request, served: Served) -> Response:
        self.seen.append(Seen(request.method, request.url.path, request.headers.get("range")))
        if served.fail_first > 0:
            served.fail_first -= 1
            return Response("try later", status_code=500)
        size = served.size
        headers = {
            "accept-ranges": "bytes",
            "x-repo-commit": COMMIT,
            "etag": f'"{served.fake_sha256 or served.sha256}"',
        }
        m = re.fullmatch(r"bytes=(\d+)-", request.headers.get("range", ""))
        start = int(m.group(1)) if m else 0
        if start >= size and m:
            return Response(status_code=416, headers={"content-range": f"bytes */{size}"})
        if request.method == "HEAD":
            return Response(headers={**headers, "content-length": str(size)})
        if not m and served.drop_first > 0:
            served.drop_first -= 1
            return _Truncated(served.path, size)
        status = 206 if m else 200
        if m:
            headers["content-range"] = f"bytes {start}-{size - 1}/{size}"
        if not served.chunked:
            headers["content-length"] = str(size - start)
        return StreamingResponse(
            _read(served.path, start),
            status_code=status,
            headers=headers,
            media_type="application/octet-stream",
        )

    async def redirect(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.seen.append(Seen(request.method, request.url.path, request.headers.get("range")))
        if name not in self.redirects:
            return Response("no such redirect", status_code=404)
        return Response(status_code=302, headers={"location": self.redirects[name]})

    async def file(self, request: Request) -> Response:
        served = self.files.get(request.path_params["name"])
        if served is None:
            return Response("no such file", status_code=404)
        return await self._serve(request, served)

    # --- the parts of the Hugging Face hub API that huggingface_hub calls -----

    async def resolve(self, request: Request) -> Response:
        repo = f"{request.path_params['owner']}/{request.path_params['repo']}"
        filename = request.path_params["filename"]
        if repo not in self.repos:
            return JSONResponse(
                {"error": "Repository not found"}, 404, headers={"x-error-code": "RepoNotFound"}
            )
        if filename not in self.repos[repo]:
            return JSONResponse(
                {"error": "Entry not found"},
                404,
                headers={"x-error-code": "EntryNotFound", "x-repo-commit": COMMIT},
            )
        return await self._serve(request, self.files[filename])

    async def model_info(self, request: Request) -> Response:
        repo = f"{request.path_params['owner']}/{request.path_params['repo']}"
        if repo not in self.repos:
            return JSONResponse(
                {"error": "Repository not found"}, 404, headers={"x-error-code": "RepoNotFound"}
            )
        names = [*self.repos[repo], "README.md", "config.json"]
        blobs = request.query_params.get("blobs") == "true"  # files_metadata=True: sizes too

        def sibling(name: str) -> dict[str, object]:
            if not blobs:
                return {"rfilename": name}
            return {"rfilename": name, "size": self.files[name].size if name in self.files else 10}

        return JSONResponse(
            {
                "id": repo,
                "modelId": repo,
                "sha": COMMIT,
                "private": False,
                "siblings": [sibling(n) for n in names],
            }
        )

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/files/{name}", self.file, methods=["GET", "HEAD"]),
                Route("/redirect/{name}", self.redirect, methods=["GET", "HEAD"]),
                Route("/api/models/{owner}/{repo}", self.model_info),
                Route("/api/models/{owner}/{repo}/revision/{rev}", self.model_info),
                Route("/{owner}/{repo}/resolve/{rev}/{filename:path}", self.resolve, methods=["GET", "HEAD"]),
            ]
        )


async def _read(path: Path, start: int) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        f.seek(start)
        while chunk := f.read(CHUNK):
            yield chunk


@contextmanager
def serve_in_thread(app: Starlette, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """Serve `app` on a free loopback port; yield its base URL (https with `tls`: cert, key)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    ssl_files = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="critical", access_log=False, lifespan="off", **ssl_files)
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.01)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
