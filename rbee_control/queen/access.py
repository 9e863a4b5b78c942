"""Who may reach what on the queen: Host allow-list, JSON-only bodies, and the two key planes.

Plain ASGI middleware (streams stay unbuffered). Outermost first:

1. `HostGuard`: a `Host` outside the allow-list is 400 — a page whose name was
   re-pointed at the queen's address (DNS rebinding) is not the queen's origin.
2. CORS, only for origins the operator allowed (`--cors-origin`); none by default.
3. `JsonOnly`: a request with a body must say `application/json` (else 415), so a
   page cannot send a "simple" `text/plain` POST that needs no CORS preflight.
4. `PlaneAuth`: `/v2/*` is the admin plane and takes only the admin key; every other
   route but `/health` and the dashboard's files (`/ui/`, which hold no data) is the
   client plane and takes the client key (or the admin key: the operator may use the
   service). The accepted principal is put in `scope["state"]["principal"]`, so a
   running request can be tied to its caller.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from rbee_worker.protocol.errors import ErrorCode, RbeeError

from .errors import queen_error_body

PUBLIC_PATHS = frozenset({"/health"})
#: the dashboard's files: a page load carries no bearer token, and they hold no data (ui_routes.py)
PUBLIC_PREFIX = "/ui/"
ADMIN_PREFIX = "/v2/"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

CLIENT = "client"
ADMIN = "admin"
ANONYMOUS = "anonymous"


async def send_error(send: Send, error: RbeeError, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(queen_error_body(error)).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": error.status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope.get("headers", []) if k == name), None)


def host_name(value: str) -> str:
    """`Host` without its port, lower case; IPv6 brackets removed."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """Names the queen answers to. With a wildcard bind, any IP literal too: rebinding needs a name."""

    names: frozenset[str]
    any_ip: bool = False

    @classmethod
    def for_bind(cls, bind_host: str, extra: Iterable[str] = ()) -> HostPolicy:
        bind = host_name(bind_host)
        wildcard = bind in ("", "0.0.0.0", "::")
        names = set(LOCAL_HOSTS) | {host_name(h) for h in extra if h.strip()}
        if not wildcard:
            names.add(bind)
        return cls(frozenset(names), any_ip=wildcard)

    def allows(self, host: str) -> bool:
        name = host_name(host)
        return name in self.names or (self.any_ip and _is_ip(name))


class HostGuard:
    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = _header(scope, b"host")
            # No Host at all is an HTTP/1.0 client, not a browser; every browser sends one.
            if given is not None and not self.policy.allows(given.decode("latin-1")):
                error = RbeeError(
                    ErrorCode.INVALID_REQUEST,
                    f"Host {given.decode('latin-1')[:100]!r} is not one this queen answers to",
                    status=400,
                    details={"field": "host"},
                    hint="start the queen with --allowed-host NAME for a name clients use",
                )
                await send_error(send, error)
                return
        await self.app(scope, receive, send)


def is_json(content_type: bytes | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class JsonOnly:
    """415 for a request body that is not declared JSON, before any key is checked."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in BODY_METHODS
            and not is_json(_header(scope, b"content-type"))
        ):
            error = RbeeError(
                ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                "request bodies must be JSON (Content-Type: application/json)",
                status=415,
                details={"field": "content-type"},
            )
            await send_error(send, error)
            return
        await self.app(scope, receive, send)


class PlaneAuth:
    """Client plane and admin plane, each with its own key; `None` leaves that plane open."""

    def __init__(self, app: ASGIApp, client_key: str | None, admin_key: str | None) -> None:
        self.app = app
        self.client = f"Bearer {client_key}".encode() if client_key else None
        self.admin = f"Bearer {admin_key}".encode() if admin_key else None

    def _is(self, given: bytes, expected: bytes | None) -> bool:
        return expected is not None and hmac.compare_digest(given, expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS or path == "/ui" or path.startswith(PUBLIC_PREFIX):
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization") or b""
        is_admin, is_client = self._is(given, self.admin), self._is(given, self.client)
        if scope["path"].startswith(ADMIN_PREFIX):
            principal = ADMIN if is_admin or self.admin is None else None
            if principal is None and is_client:
                error = RbeeError(
                    ErrorCode.FORBIDDEN,
                    "the client key cannot reach the admin plane (/v2/*); use the admin key",
                    status=403,
                )
                await send_error(send, error)
                return
        elif is_admin:
            principal = ADMIN
        elif is_client:
            principal = CLIENT
        else:
            principal = ANONYMOUS if self.client is None else None
        if principal is None:
            error = RbeeError(ErrorCode.INVALID_API_KEY, "missing or wrong bearer token", status=401)
            await send_error(send, error, [(b"www-authenticate", b"Bearer")])
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)
