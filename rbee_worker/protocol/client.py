"""`WorkerClient`: the one client of a worker's HTTP API, for the keeper, the queen, the hive and tests.

It builds every URL (ids are checked before they go into a path), sends the key,
and turns error bodies into `RbeeError` with the worker's own code and status.
Transport failures stay `httpx.HTTPError`: whether a refused connection means
"retry elsewhere" or "the worker crashed" is the caller's call, not the wire's.
A worker beyond loopback serves HTTPS with its hive's certificate: pass `verify`
(an `ssl.SSLContext` pinning it) or an `http` client built with one.

The worker names every generation itself (a caller could otherwise pick, and then
cancel, another caller's id): an id given to `stream` travels as `X-Request-ID`
only to correlate logs, and `InferenceStream.request_id` is the worker's own.

    async with WorkerClient(url, key) as worker:
        async with await worker.stream(InferenceRequest(prompt="hi")) as stream:
            async for event in stream.events():
                ...
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx

from .embeddings import EmbeddingRequest
from .errors import RbeeError
from .events import Batch, Event, iter_event_batches
from .request import InferenceRequest
from .wire import invalid

#: Request ids the worker and the queen accept in a path and in `X-Request-ID`.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")

DEFAULT_TIMEOUT = httpx.Timeout(10.0, read=300.0)


def check_request_id(request_id: str) -> str:
    if not isinstance(request_id, str) or not REQUEST_ID_RE.fullmatch(request_id):
        raise invalid("request_id", "expected 1-128 characters of A-Z a-z 0-9 . _ : -")
    return request_id


def check_worker_url(url: str) -> str:
    """`http(s)://host:port[/prefix]` without a trailing slash, or an error naming the field."""
    parts = urlsplit(url if isinstance(url, str) else "")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise invalid("url", f"expected an http(s) URL such as http://10.0.0.5:8081, got {url!r}")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def error_from_response(status: int, content: bytes) -> RbeeError:
    """A worker's error answer as the `RbeeError` it stands for (a body that is not ours included)."""
    try:
        body: Any = json.loads(content)
    except ValueError:
        body = content[:300].decode(errors="replace")
    return RbeeError.from_body(body, status)


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """`GET /v1/ready`: 200 when `state` is `ready`, 503 while loading, failed or draining."""

    http_status: int
    state: str | None
    progress: float = 0.0
    worker_id: str | None = None
    model: str | None = None
    slots: int | None = None
    slots_busy: int | None = None
    runtime: str | None = None
    backend: str | None = None
    device: int | None = None
    vram_bytes: int | None = None
    chat: bool | None = None
    error: RbeeError | None = field(default=None, compare=False)
    #: it serves `/v1/embeddings` and nothing else
    embedding: bool = False

    @property
    def ok(self) -> bool:
        return self.http_status == 200 and self.state == "ready"

    @classmethod
    def from_json(cls, http_status: int, body: Any) -> WorkerReady:
        if not isinstance(body, dict):
            return cls(http_status, None)

        def typed(name: str, kind: type) -> Any:
            value = body.get(name)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        error = body.get("error")
        progress = body.get("progress")
        chat = body.get("chat")
        return cls(
            http_status,
            state=typed("state", str),
            progress=float(progress) if isinstance(progress, int | float) else 0.0,
            worker_id=typed("worker_id", str),
            model=typed("model", str),
            slots=typed("slots", int),
            slots_busy=typed("slots_busy", int),
            runtime=typed("runtime", str),
            backend=typed("backend", str),
            device=typed("device", int),
            vram_bytes=typed("vram_bytes", int),
            chat=chat if isinstance(chat, bool) else None,
            error=RbeeError.from_body({"error": error}, http_status) if isinstance(error, dict) else None,
            embedding=body.get("embedding") is True,
        )


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What `/metrics` says about activity: busy slots and when the last token left."""

    slots_busy: int
    last_token_at: float


class InferenceStream:
    """An open `POST /v1/inference` answer (status 200); iterate `events()` or `batches()`, then close."""

    def __init__(self, response: httpx.Response, request_id: str, correlation_id: str | None = None) -> None:
        self.response = response
        #: the worker's name for the generation: what `WorkerClient.cancel` takes
        self.request_id = request_id
        #: the caller's id, echoed back by the worker in `X-Correlation-ID`
        self.correlation_id = correlation_id

    async def batches(self) -> AsyncIterator[Batch]:
        """(exact bytes, event) lists per network read, read to the body's end (keeps the connection)."""
        async for batch in iter_event_batches(self.response.aiter_bytes()):
            yield batch

    async def events(self) -> AsyncIterator[Event]:
        async for batch in self.batches():
            for _raw, event in batch:
                yield event

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> InferenceStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class WorkerClient:
    """One worker (`url`, `api_key`) over an `httpx.AsyncClient`: shared when given, else its own."""

    def __init__(
        self,
        url: str,
        api_key: str,
        http: httpx.AsyncClient | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.url = check_worker_url(url)
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._owned = http is None
        self.http = http if http is not None else httpx.AsyncClient(timeout=timeout, verify=verify)

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        return f"WorkerClient({self.url!r})"

    async def aclose(self) -> None:
        if self._owned:
            await self.http.aclose()

    async def __aenter__(self) -> WorkerClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- inference -----------------------------------------------------------------

    async def stream(self, request: InferenceRequest, correlation_id: str | None = None) -> InferenceStream:
        """Send `request`; the open stream, or the worker's refusal raised as `RbeeError`."""
        headers = dict(self._auth)
        if correlation_id is not None:
            headers["X-Request-ID"] = check_request_id(correlation_id)
        outgoing = self.http.build_request(
            "POST", f"{self.url}/v1/inference", json=request.to_json(), headers=headers
        )
        response = await self.http.send(outgoing, stream=True)
        if response.status_code != 200:
            try:
                content = await response.aread()
            finally:
                await response.aclose()
            raise error_from_response(response.status_code, content)
        minted = response.headers.get("x-request-id", "")
        return InferenceStream(response, minted or correlation_id or "", correlation_id)

    async def embeddings(
        self, request: EmbeddingRequest, correlation_id: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """`POST /v1/embeddings`: OpenAI's answer as the worker wrote it, or its refusal as `RbeeError`."""
        headers = dict(self._auth)
        if correlation_id is not None:
            headers["X-Request-ID"] = check_request_id(correlation_id)
        response = await self.http.post(
            f"{self.url}/v1/embeddings",
            json=request.to_json(),
            headers=headers,
            timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        if response.status_code != 200:
            raise error_from_response(response.status_code, response.content)
        body = response.json()
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise error_from_response(502, response.content)
        return body

    async def cancel(self, request_id: str, timeout: float | None = 2.0) -> bool:
        """`DELETE /v1/inference/{id}`: true when the worker stopped it (its stream ends `cancelled`)."""
        path = f"/v1/inference/{check_request_id(request_id)}"
        response = await self.http.delete(f"{self.url}{path}", headers=self._auth, timeout=timeout)
        return response.status_code == 200

    # --- state -----------------------------------------------------------------------

    async def health(self, timeout: float | None = 5.0) -> bool:
        """Liveness (`GET /health`, no key): false on any transport failure or non-200."""
        try:
            response = await self.http.get(f"{self.url}/health", timeout=timeout)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def ready(self, timeout: float | None = 5.0) -> WorkerReady:
        """Readiness; a refused key is raised (`INVALID_API_KEY`), every other answer returned."""
        response = await self.http.get(f"{self.url}/v1/ready", headers=self._auth, timeout=timeout)
        if response.status_code == 401:
            raise error_from_response(401, response.content)
        try:
            body = response.json()
        except ValueError:
            body = None
        return WorkerReady.from_json(response.status_code, body)

    async def metrics_text(self, timeout: float | None = 5.0) -> str:
        response = await self.http.get(f"{self.url}/metrics", headers=self._auth, timeout=timeout)
        if response.status_code != 200:
            raise error_from_response(response.status_code, response.content)
        return response.text

    async def load(self, timeout: float | None = 5.0) -> WorkerLoad:
        """Busy slots and the last token's time, from `/metrics`; `ValueError` if it does not parse."""
        from prometheus_client.parser import text_string_to_metric_families

        text = await self.metrics_text(timeout)
        samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
        busy = sum(s.value for s in samples if s.name == "rbee_worker_slots_busy")
        last = max(
            (s.value for s in samples if s.name == "rbee_worker_last_token_timestamp_seconds"), default=0
        )
        return WorkerLoad(slots_busy=int(busy), last_token_at=float(last))

    async def shutdown(self, timeout: float | None = 2.0) -> None:
        """Ask the worker to drain and exit (`POST /v1/admin/shutdown`)."""
        response = await self.http.post(f"{self.url}/v1/admin/shutdown", headers=self._auth, timeout=timeout)
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content)


__all__ = [
    "REQUEST_ID_RE",
    "InferenceStream",
    "WorkerClient",
    "WorkerLoad",
    "WorkerReady",
    "check_request_id",
    "check_worker_url",
]
