"""Model references: what the operator typed, and the download source it resolves to.

    hf:owner/repo[@revision]                     a repo: Q4_K_M, else nearest 4-bit, else smallest
    hf:owner/repo[@revision]:Q8_0                one quantization of it, by tag (case-insensitive)
    hf:owner/repo[@revision]:path/file.gguf      one file of it (also hf:owner/repo/path/file.gguf)
    https://host/path/file.gguf                  any HTTP(S) URL (http:// too, for a LAN mirror)
    file:/abs/path/file.gguf                     a file already on this node

Hugging Face refs are resolved with huggingface_hub (listing, `/resolve` URL, auth
headers, and the hub's size and sha256), but the bytes are fetched by our own
downloader so every source gets the same `.part` resume, retries and progress.
A split GGUF (`-00001-of-0000N.gguf`) resolves to all its parts. HF_ENDPOINT and
HF_TOKEN are read by huggingface_hub as usual.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, unquote, urlsplit

from rbee_worker.protocol.errors import ErrorCode, RbeeError

from .hf_files import SPLIT_RE, Quant, RepoFile, choose, group
from .paths import MODEL_NAME_RE

_HF_RE = re.compile(
    r"hf:(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w./-]+?))?"
    r"(?::(?P<file>[^:]+\.gguf)|/(?P<path>[^:@]+\.gguf)|:(?P<tag>[A-Za-z0-9_.-]+))?"
)
T = TypeVar("T")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_FORMATS = (
    "hf:owner/repo[:TAG|:file.gguf] (Hugging Face), https://host/path/file.gguf (HTTP), "
    "file:/abs/path/file.gguf (a file on the node)"
)


class TransientError(Exception):
    """A failure worth another attempt (network trouble, 5xx, a dropped stream)."""


@dataclass(frozen=True, slots=True)
class ModelRef:
    raw: str  # canonical spelling: what the catalog stores
    kind: str  # "hf" | "http" | "file"
    location: str  # repo id, URL or absolute path
    filename: str | None = None
    revision: str | None = None
    #: a quantization tag (upper case) for an hf repo, instead of a file name
    tag: str | None = None

    @property
    def default_name(self) -> str | None:
        """The file name without `.gguf`, made into a legal model name; None until an hf repo is listed."""
        if self.filename is None:
            return None
        return name_from_filename(self.filename)

    @property
    def split(self) -> bool:
        return self.filename is not None and SPLIT_RE.search(self.filename) is not None


@dataclass(slots=True)
class Source:
    """Where the bytes come from, and what the source itself promises about them."""

    url: str
    filename: str
    headers: dict[str, str] = field(default_factory=dict)
    size: int | None = None
    sha256: str | None = None


def name_from_filename(filename: str) -> str:
    stem = SPLIT_RE.sub("", Path(filename).name)  # a split set is named once, not per part
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).lstrip("._-")[:128]
    return name if MODEL_NAME_RE.fullmatch(name) else "model"


def parse_ref(raw: str) -> ModelRef:
    """Parse without touching the network; a malformed ref is a usage error (400)."""
    ref = raw.strip()
    if ref.startswith("hf:"):
        m = _HF_RE.fullmatch(ref)
        if m and m["path"]:  # one spelling per file: the catalog compares refs
            rev = f"@{m['rev']}" if m["rev"] else ""
            return ModelRef(f"hf:{m['repo']}{rev}:{m['path']}", "hf", m["repo"], m["path"], m["rev"])
        if m and m["tag"]:
            return ModelRef(ref, "hf", m["repo"], None, m["rev"], m["tag"].upper())
        if m:
            return ModelRef(ref, "hf", m["repo"], m["file"], m["rev"])
    elif ref.startswith(("https://", "http://")):
        parts = urlsplit(ref)
        filename = unquote(parts.path.rsplit("/", 1)[-1])
        if parts.hostname and filename:
            return ModelRef(ref, "http", ref, filename)
    elif ref.startswith("file:"):
        path = ref[len("file:") :]
        if path.startswith("//"):  # file:///abs/path
            path = path[2:]
        path = unquote(path)  # exactly once: `%2541` names a file called `%41`
        if path.startswith("/"):
            path = os.path.normpath(path)  # one spelling per file, so a re-add finds the cached row
            return ModelRef(file_ref(path), "file", path, Path(path).name)
    raise RbeeError(
        ErrorCode.INVALID_REQUEST,
        f"invalid model reference {raw!r}",
        details={"ref": raw, "expected": _FORMATS},
        hint="e.g. "
        "rbee-hive models add hf:TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF:tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf",
    )


def file_ref(path: str | os.PathLike[str]) -> str:
    """The `file:` ref naming `path`, percent-encoded so that `parse_ref` gives `path` back."""
    return "file:" + quote(os.fspath(path))


def http_source(ref: ModelRef) -> Source:
    return Source(url=ref.location, filename=ref.filename or "model.gguf")


@dataclass(slots=True)
class Resolution:
    """What an hf ref resolved to: one source per file (a split set has several), and why these."""

    sources: list[Source]
    quant: Quant | None = None
    note: str | None = None

    @property
    def filename(self) -> str:
        return self.sources[0].filename


async def hf_source(ref: ModelRef) -> Resolution:
    """Resolve an hf ref through huggingface_hub (blocking HTTP, so in a thread)."""
    return await asyncio.to_thread(_resolve_hf, ref)


async def hf_quants(ref: ModelRef) -> list[Quant]:
    """The repo's GGUF models with their sizes, for `models search`."""
    return await asyncio.to_thread(_hub_call, ref, lambda: _list_quants(_api(), ref, sizes=True))


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub's HTTP layer raises on network trouble (httpx2 in 1.x+, else requests)."""
    try:
        import httpx2

        return (OSError, httpx2.TransportError)
    except ImportError:
        return (OSError,)


def _api() -> object:
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def _list_quants(api: object, ref: ModelRef, sizes: bool = False) -> list[Quant]:
    info = api.model_info(ref.location, revision=ref.revision, files_metadata=sizes)  # type: ignore[attr-defined]
    return group(RepoFile(s.rfilename, getattr(s, "size", None)) for s in info.siblings or [])


def _resolve_hf(ref: ModelRef) -> Resolution:
    def resolve() -> Resolution:
        if ref.filename is not None and not ref.split:
            return Resolution([_file_source(ref, ref.filename)])
        quants = _list_quants(_api(), ref, sizes=ref.filename is None and ref.tag is None)
        if ref.filename is not None:  # one part named: the whole set it belongs to
            quant = next((q for q in quants if ref.filename in (f.path for f in q.files)), None)
            if quant is None:
                raise RbeeError(
                    ErrorCode.MODEL_NOT_FOUND,
                    f"{ref.raw}: the repo has no complete split set with this part",
                    details={"ref": ref.raw, "gguf_files": [q.to_json() for q in quants[:50]]},
                    hint=f"rbee-keeper models search hf:{ref.location}",
                )
            note = None
        else:
            quant, note = choose(quants, ref.raw, ref.tag)
        return Resolution([_file_source(ref, f.path) for f in quant.files], quant, note)

    return _hub_call(ref, resolve)


def _hub_call(ref: ModelRef, call: Callable[[], T]) -> T:
    """Run a hub call, turning huggingface_hub's exceptions into our codes (or TransientError)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        return call()
    except GatedRepoError as exc:
        raise _hf_denied(ref, exc) from None
    except OfflineModeIsEnabled:
        raise RbeeError(
            ErrorCode.DOWNLOAD_FAILED,
            f"cannot fetch {ref.raw}: Hugging Face offline mode is on",
            status=503,
            details={"ref": ref.raw},
            hint="unset HF_HUB_OFFLINE on the node, or add the file with a file: ref",
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise RbeeError(
            ErrorCode.MODEL_NOT_FOUND,
            f"not found on the hub: {ref.raw}",
            details={"ref": ref.raw, "reason": str(exc).splitlines()[0][:300]},
            hint="check the repo and file name on https://huggingface.co/",
        ) from None
    except FileMetadataError as exc:
        raise RbeeError(
            ErrorCode.DOWNLOAD_FAILED,
            f"{endpoint or 'the hub'} does not answer like a Hugging Face hub",
            details={"ref": ref.raw, "reason": str(exc)[:300]},
            hint="check HF_ENDPOINT on the node",
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            raise _hf_denied(ref, exc) from None
        if 400 <= status < 500 and status not in (408, 429):
            raise RbeeError(
                ErrorCode.DOWNLOAD_FAILED,
                f"the hub refused {ref.raw} (HTTP {status})",
                details={"ref": ref.raw, "status": status, "reason": str(exc).splitlines()[0][:300]},
            ) from None
        raise TransientError(f"hub answered HTTP {status}") from exc
    except _network_errors() as exc:
        raise TransientError(f"cannot reach the hub: {type(exc).__name__}: {exc}") from exc


def _file_source(ref: ModelRef, filename: str) -> Source:
    """The download URL, auth headers, size and sha256 of one file (a HEAD to the hub)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    endpoint = os.environ.get("HF_ENDPOINT") or None
    url = hf_hub_url(ref.location, filename, revision=ref.revision, endpoint=endpoint)
    headers = build_hf_headers()
    meta = get_hf_file_metadata(url, headers=headers, endpoint=endpoint)
    location = meta.location or url
    if url.startswith("https:") and not location.startswith("https:"):
        raise RbeeError(
            ErrorCode.DOWNLOAD_FAILED,
            f"refusing a redirect from https to {location.split(':', 1)[0]}: {url} -> {location}",
            status=502,
            details={"url": url, "redirect": location},
        )
    if urlsplit(location).hostname != urlsplit(url).hostname:
        headers.pop("authorization", None)  # a signed CDN URL must not receive the token
    etag = (meta.etag or "").lower()
    return Source(
        url=location,
        filename=filename,
        headers={k: v for k, v in headers.items() if k.lower() in ("authorization", "user-agent")},
        size=meta.size,
        sha256=etag if _SHA256_RE.fullmatch(etag) else None,
    )


def _hf_denied(ref: ModelRef, exc: Exception) -> RbeeError:
    return RbeeError(
        ErrorCode.DOWNLOAD_FAILED,
        f"access denied to {ref.raw}",
        status=403,
        details={"ref": ref.raw, "reason": str(exc).splitlines()[0][:300]},
        hint="this model needs a Hugging Face token: export HF_TOKEN=... on the node",
    )
