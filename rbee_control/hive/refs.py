"""Model references: what the operator typed, and the download source it resolves to.

    hf:owner/repo[@revision][:path/file.gguf]   a Hugging Face repo (HF_ENDPOINT honoured)
    https://host/path/file.gguf                  any HTTP(S) URL (http:// too, for a LAN mirror)
    file:/abs/path/file.gguf                     a file already on this node

Hugging Face refs are resolved with huggingface_hub (listing, `/resolve` URL, auth
headers, and the hub's size and sha256), but the bytes are fetched by our own
downloader so every source gets the same `.part` resume, retries and progress.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from rbee_worker.protocol.errors import ErrorCode, RbeeError

from .paths import MODEL_NAME_RE

_HF_RE = re.compile(r"hf:(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w./-]+?))?(?::(?P<file>[^:]+\.gguf))?")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_FORMATS = (
    "hf:owner/repo[:file.gguf] (Hugging Face), https://host/path/file.gguf (HTTP), "
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

    @property
    def default_name(self) -> str | None:
        """The file name without `.gguf`, made into a legal model name; None until an hf repo is listed."""
        if self.filename is None:
            return None
        return name_from_filename(self.filename)


@dataclass(slots=True)
class Source:
    """Where the bytes come from, and what the source itself promises about them."""

    url: str
    filename: str
    headers: dict[str, str] = field(default_factory=dict)
    size: int | None = None
    sha256: str | None = None


def name_from_filename(filename: str) -> str:
    stem = Path(filename).name
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).lstrip("._-")[:128]
    return name if MODEL_NAME_RE.fullmatch(name) else "model"


def parse_ref(raw: str) -> ModelRef:
    """Parse without touching the network; a malformed ref is a usage error (400)."""
    ref = raw.strip()
    if ref.startswith("hf:"):
        m = _HF_RE.fullmatch(ref)
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


async def hf_source(ref: ModelRef) -> Source:
    """Resolve an hf ref through huggingface_hub (blocking HTTP, so in a thread)."""
    return await asyncio.to_thread(_resolve_hf, ref)


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub's HTTP layer raises on network trouble (httpx2 in 1.x+, else requests)."""
    try:
        import httpx2

        return (OSError, httpx2.TransportError)
    except ImportError:
        return (OSError,)


def _resolve_hf(ref: ModelRef) -> Source:
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import build_hf_headers

    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        filename = ref.filename or _single_gguf(HfApi(endpoint=endpoint), ref)
        url = hf_hub_url(ref.location, filename, revision=ref.revision, endpoint=endpoint)
        headers = build_hf_headers()
        meta = get_hf_file_metadata(url, headers=headers, endpoint=endpoint)
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


def _single_gguf(api: object, ref: ModelRef) -> str:
    info = api.model_info(ref.location, revision=ref.revision)  # type: ignore[attr-defined]
    ggufs = sorted(s.rfilename for s in info.siblings or [] if s.rfilename.lower().endswith(".gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    raise RbeeError(
        ErrorCode.INVALID_REQUEST,
        f"{ref.raw}: the repo has {len(ggufs)} .gguf files; name one",
        details={"ref": ref.raw, "gguf_files": ggufs[:50]},
        hint=f"rbee-hive models add hf:{ref.location}:{ggufs[0]}" if ggufs else None,
    )


def _hf_denied(ref: ModelRef, exc: Exception) -> RbeeError:
    return RbeeError(
        ErrorCode.DOWNLOAD_FAILED,
        f"access denied to {ref.raw}",
        status=403,
        details={"ref": ref.raw, "reason": str(exc).splitlines()[0][:300]},
        hint="this model needs a Hugging Face token: export HF_TOKEN=... on the node",
    )
