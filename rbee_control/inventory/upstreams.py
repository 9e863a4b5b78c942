"""`upstreams:` in the inventory: OpenAI-compatible engines rbee routes to but does not manage.

An operator who already runs vLLM, SGLang, llama-server or Ollama lists it here
and the queen offers its models next to rbee's own. The URL is the engine's
OpenAI base (`http://host:port/v1`); its key, if it needs one, lives in the
secrets file (`upstream_keys`), never here: a URL with `user:password@` in it is
refused, since this file gets pasted and committed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from rbee_control.inventory.model import NODE_NAME_RE

UPSTREAM_KEYS = ("url", "models")
#: A model name as an upstream reports it (`org/name:tag`, `name.gguf`): printable, no spaces.
MODEL_ID_RE = re.compile(r"[A-Za-z0-9_.:@/+-]{1,200}")
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")


@dataclass(frozen=True, slots=True)
class Upstream:
    """One external engine. `models` None: whatever its own `GET /models` lists."""

    name: str
    url: str
    models: tuple[str, ...] | None = None

    def endpoint(self, path: str) -> str:
        """`<url>/<path>`: the URL already ends in the API root (`…/v1`)."""
        return f"{self.url}/{path.lstrip('/')}"


Fail = Callable[[str], Any]


def check_url(text: str, fail: Fail) -> str:
    """An http(s) base URL with a host, no credentials, query or fragment; without a trailing `/`."""
    if any(ch.isspace() for ch in text):
        fail("expected a URL without spaces, like http://10.0.0.5:8000/v1")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        return fail(f"not a valid URL ({exc})")
    if parts.scheme not in ("http", "https"):
        fail(f"expected an http:// or https:// URL, not {parts.scheme or 'no'} scheme")
    if parts.username is not None or parts.password is not None:
        fail("credentials do not belong in the inventory; put the key in the secrets file (upstream_keys)")
    host = parts.hostname or ""
    if not _is_host(host):
        fail("expected a host name or IP address after the scheme, like http://10.0.0.5:8000/v1")
    if parts.query or parts.fragment:
        fail("expected a base URL without ?query or #fragment")
    if port == 0:
        fail("expected a port 1–65535")
    return text.rstrip("/")


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_RE.fullmatch(host)) and ".." not in host


def check_name(name: Any, fail: Fail) -> str:
    if not isinstance(name, str) or not NODE_NAME_RE.fullmatch(name):
        fail(f"invalid upstream name {name!r}: use 1–64 letters, digits, '.', '_' or '-'")
    return str(name)


def check_models(value: Any, fail_at: Callable[[int | None, str], Any]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        fail_at(None, "expected a non-empty list of model names (or leave `models` out)")
    seen: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or not MODEL_ID_RE.fullmatch(item):
            fail_at(index, f"invalid model name {item!r}: letters, digits and _.:@/+- only")
        if item in seen:
            fail_at(index, f"model {item!r} listed twice")
        seen.append(item)
    return tuple(seen)
