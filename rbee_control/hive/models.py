"""`models add/list/rm/verify`: the path from a reference to a catalogued, loadable file.

    fetch into <name>.gguf.part → check size and sha256 → parse as GGUF → rename → catalog row

Each step can refuse, and a refusal leaves the catalog as it was: a bad file is
deleted, an interrupted transfer keeps its `.part` for resume, and the row is
written last. A per-name lock file serialises two `add`s of the same model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import hashlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from rbee_worker.gguf_info import read_gguf_info
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.node_events import Emitter

from .catalog import Catalog, ModelRow
from .download import RetryPolicy, download, import_file, sha256_file
from .hf_files import SPLIT_RE
from .part_file import PartDigest
from .paths import HivePaths, check_model_name
from .refs import (
    ModelRef,
    Resolution,
    Source,
    TransientError,
    hf_source,
    http_source,
    name_from_filename,
    parse_ref,
)

T = TypeVar("T")


@contextmanager
def _name_lock(path: Path) -> Iterator[None]:
    """An exclusive lock per model name, removed when released (inode check: no two holders)."""
    while True:
        f = path.open("a")
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # the file we locked was unlinked by the previous holder: take the new one
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        f.close()


def _cached(row: ModelRow) -> dict[str, Any]:
    return {**row.to_json(with_template=True), "cached": True}


def _lookup_cached(catalog: Catalog, ref: ModelRef, name: str | None) -> ModelRow | None:
    """A catalogued model whose file is still there; a row whose file vanished is dropped."""
    row = catalog.get(name) if name else next((r for r in catalog.list() if r.ref == ref.raw), None)
    if row is None:
        return None
    if row.ref != ref.raw:
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"model name {row.name!r} is already used for {row.ref}",
            status=409,
            details={"name": row.name, "ref": row.ref},
            hint=f"choose another --name, or rbee-hive models rm {row.name}",
        )
    if not Path(row.path).is_file():
        catalog.remove(row.name)
        return None
    return row


async def add_model(
    paths: HivePaths,
    raw_ref: str,
    emitter: Emitter,
    name: str | None = None,
    sha256: str | None = None,
    policy: RetryPolicy | None = None,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """Fetch, verify, validate and catalogue one model; return its catalog row (+ `cached`).

    `max_bytes` (default `RetryPolicy.max_bytes`) caps what a download may write.
    """
    paths.ensure()
    ref = parse_ref(raw_ref)
    if name is not None:
        check_model_name(name)
    if sha256 is not None:
        sha256 = sha256.lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise RbeeError(ErrorCode.INVALID_REQUEST, "--sha256 must be 64 hex digits")
    if ref.location.startswith("http://") and sha256 is None:
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"{ref.raw}: plain http needs --sha256 (anyone on the path could change the bytes)",
            details={"ref": ref.raw},
            hint="use an https:// URL, or give the file's sha256: --sha256 HEX",
        )
    catalog = Catalog(paths.db)
    row = _lookup_cached(catalog, ref, name or ref.default_name)
    if row is not None:
        return _cached(row)

    policy = policy or RetryPolicy.from_env()
    if max_bytes is not None:
        if max_bytes < 1:
            raise RbeeError(ErrorCode.INVALID_REQUEST, "--max-bytes must be positive", status=400)
        policy = dataclasses.replace(policy, max_bytes=max_bytes)
    resolution: Resolution | None = None
    if ref.kind == "hf" and (ref.filename is None or ref.split):
        resolution = await _resolve_with_retries(ref, policy)
        _say_choice(emitter, ref, resolution)
        if name is None:
            row = _lookup_cached(catalog, ref, name_from_filename(resolution.filename))
            if row is not None:
                return _cached(row)
    name = name or ref.default_name or name_from_filename(resolution.filename if resolution else "model")
    with _name_lock(paths.model_lock(name)):
        row = _lookup_cached(catalog, ref, name)
        if row is not None:
            return _cached(row)
        if resolution is not None and len(resolution.sources) > 1:
            return await _install_split(paths, catalog, ref, name, resolution.sources, emitter, policy)
        source = resolution.sources[0] if resolution else None
        return await _fetch_and_install(paths, catalog, ref, name, sha256, source, emitter, policy)


def _say_choice(emitter: Emitter, ref: ModelRef, resolution: Resolution) -> None:
    quant = resolution.quant
    if quant is None:
        return
    size = f", {quant.size / 1e6:.1f} MB" if quant.size else ""
    parts = f" in {len(quant.files)} parts" if len(quant.files) > 1 else ""
    why = f": {resolution.note}" if resolution.note else ""
    emitter.log(f"{ref.raw}: using {quant.primary}{parts}{size}{why}")


async def _resolve_with_retries(ref: ModelRef, policy: RetryPolicy) -> Resolution:
    return await resolve_retried(ref, lambda: hf_source(ref), policy)


async def resolve_retried(
    ref: ModelRef, call: Callable[[], Awaitable[T]], policy: RetryPolicy | None = None
) -> T:
    """A hub call with the download's retries: the hub too has bad seconds."""
    policy = policy or RetryPolicy.from_env()
    attempt = 1
    while True:
        try:
            return await call()
        except TransientError as exc:
            if attempt >= policy.attempts:
                raise RbeeError(
                    ErrorCode.DOWNLOAD_FAILED,
                    f"cannot resolve {ref.raw} after {attempt} attempts: {exc}",
                    details={"ref": ref.raw, "attempts": attempt, "last_error": str(exc)},
                    hint="check the node's network and HF_ENDPOINT",
                ) from None
        await asyncio.sleep(policy.delay(attempt))
        attempt += 1


async def _fetch_and_install(
    paths: HivePaths,
    catalog: Catalog,
    ref: ModelRef,
    name: str,
    sha256: str | None,
    source: Source | None,
    emitter: Emitter,
    policy: RetryPolicy,
) -> dict[str, Any]:
    part, final = paths.model_part(name), paths.model_file(name)
    if ref.kind == "file":
        src = Path(ref.location)
        how = await import_file(src, part, emitter, consume=src.parent.resolve() == paths.incoming_dir)
        digest = await _check_sha(part, sha256, emitter, refused_by=ref.raw)
    else:
        how = "download"
        digest = await _download_verified(ref, part, sha256, source, emitter, policy)
    emitter.log("checking GGUF metadata")
    try:
        info = await asyncio.to_thread(read_gguf_info, part)
    except RbeeError:
        part.unlink(missing_ok=True)
        raise
    part.replace(final)
    row = ModelRow(
        name=name,
        ref=ref.raw,
        path=str(final),
        size=info.size,
        sha256=digest,
        architecture=info.architecture,
        tokenizer_model=info.tokenizer_model,
        quantization=info.quantization,
        context_length=info.context_length,
        chat_template=info.chat_template,
        added_at=round(time.time(), 3),
    )
    stored = catalog.add(row)
    emitter.log(f"{name}: {info.architecture} {info.quantization}, {info.size} bytes ({how})")
    return {**stored.to_json(with_template=True), "cached": False}


async def _install_split(
    paths: HivePaths,
    catalog: Catalog,
    ref: ModelRef,
    name: str,
    sources: list[Source],
    emitter: Emitter,
    policy: RetryPolicy,
) -> dict[str, Any]:
    """A split GGUF: every part verified on its own, renamed together; the row names the first part.

    The parts keep the `-0000k-of-0000N` names, which is how llama.cpp finds the
    rest when it opens the first. The catalogued sha256 is that of the parts' sha256s.
    """
    finals = [paths.split_file(name, i + 1, len(sources)) for i in range(len(sources))]
    digests = []
    for i, (source, final) in enumerate(zip(sources, finals, strict=True)):
        emitter.log(f"part {i + 1}/{len(sources)}: {source.filename}")
        part = final.with_name(final.name + ".part")
        digests.append(await _download_verified(ref, part, None, source, emitter, policy))
    first = finals[0].with_name(finals[0].name + ".part")
    emitter.log("checking GGUF metadata")
    try:
        info = await asyncio.to_thread(read_gguf_info, first)
    except RbeeError:
        for final in finals:
            final.with_name(final.name + ".part").unlink(missing_ok=True)
        raise
    for final in finals:
        final.with_name(final.name + ".part").replace(final)
    size = sum(f.stat().st_size for f in finals)
    row = ModelRow(
        name=name,
        ref=ref.raw,
        path=str(finals[0]),
        size=size,
        sha256=set_digest(digests),
        architecture=info.architecture,
        tokenizer_model=info.tokenizer_model,
        quantization=info.quantization,
        context_length=info.context_length,
        chat_template=info.chat_template,
        added_at=round(time.time(), 3),
    )
    stored = catalog.add(row)
    emitter.log(f"{name}: {info.architecture} {info.quantization}, {size} bytes in {len(finals)} parts")
    return {**stored.to_json(with_template=True), "cached": False}


def set_digest(digests: list[str]) -> str:
    """One sha256 for a split set: of its parts' hex digests, one per line, in part order."""
    return hashlib.sha256("".join(d + "\n" for d in digests).encode()).hexdigest()


def split_parts(path: Path) -> list[Path]:
    """All files of the split set whose first part is `path` (just `path` when it is not split)."""
    m = SPLIT_RE.search(path.name)
    if m is None:
        return [path]
    count, stem = int(m.group(2)), path.name[: m.start()]
    return [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


async def _download_verified(
    ref: ModelRef,
    part: Path,
    sha256: str | None,
    source: Source | None,
    emitter: Emitter,
    policy: RetryPolicy,
) -> str:
    """Download until size and sha256 agree; return the digest."""

    async def resolve() -> Source:
        nonlocal source
        if source is None:
            source = (await hf_source(ref)).sources[0] if ref.kind == "hf" else http_source(ref)
        return source

    resumed = part.exists() and part.stat().st_size > 0
    while True:
        digest = PartDigest(part)
        got = await download(resolve, part, emitter, policy, digest)
        try:
            _check_size(part, got)
            return _check_digest(part, await digest.finish(emitter), sha256 or got.sha256, refused_by=ref.raw)
        except RbeeError as exc:
            part.unlink(missing_ok=True)
            # a resumed file may splice two versions of the source: one clean retry is worth it
            if not resumed or exc.code != ErrorCode.CHECKSUM_MISMATCH:
                raise
            resumed = False
            emitter.log("checksum mismatch on a resumed download; downloading again from the start")


def _check_size(part: Path, source: Source) -> None:
    size = part.stat().st_size
    if source.size is not None and size != source.size:
        raise RbeeError(
            ErrorCode.DOWNLOAD_FAILED,
            f"size mismatch: got {size} bytes, expected {source.size}",
            details={"size": size, "expected_size": source.size, "url": source.url},
        )


async def _check_sha(part: Path, expected: str | None, emitter: Emitter, refused_by: str) -> str:
    return _check_digest(part, await sha256_file(part, emitter), expected, refused_by)


def _check_digest(part: Path, digest: str, expected: str | None, refused_by: str) -> str:
    if expected is not None and digest != expected:
        part.unlink(missing_ok=True)
        raise RbeeError(
            ErrorCode.CHECKSUM_MISMATCH,
            f"sha256 mismatch for {refused_by}: file deleted",
            details={"expected": expected, "actual": digest, "ref": refused_by},
            hint="check the --sha256 value against the model's page",
        )
    return digest


def list_models(paths: HivePaths) -> list[ModelRow]:
    return Catalog(paths.ensure().db).list()


def remove_model(paths: HivePaths, name: str) -> dict[str, Any]:
    """Drop the row first (nothing may load a file being deleted), then the file and any `.part`."""
    check_model_name(name)
    catalog = Catalog(paths.ensure().db)
    row = catalog.require(name)
    catalog.remove(name)
    freed = 0
    for file in split_parts(Path(row.path)):
        freed += file.stat().st_size if file.exists() else 0
        file.unlink(missing_ok=True)
        file.with_name(file.name + ".part").unlink(missing_ok=True)
    paths.model_part(name).unlink(missing_ok=True)
    return {"name": name, "removed": True, "path": row.path, "freed_bytes": freed}


async def verify_model(paths: HivePaths, name: str, emitter: Emitter) -> dict[str, Any]:
    """Re-hash and re-parse a catalogued file: did it change or rot since it was added?"""
    check_model_name(name)
    row = Catalog(paths.ensure().db).require(name)
    path = Path(row.path)
    missing = [p for p in split_parts(path) if not p.is_file()]
    if missing:
        raise RbeeError(
            ErrorCode.INVALID_MODEL_FILE,
            f"{name}: file {missing[0]} is missing",
            details={"name": name, "path": str(path)},
            hint=f"rbee-hive models rm {name} && rbee-hive models add {row.ref}",
        )
    parts = split_parts(path)
    if len(parts) > 1:
        digest = set_digest([await sha256_file(p, emitter) for p in parts])
    else:
        digest = await sha256_file(path, emitter)
    if digest != row.sha256:
        raise RbeeError(
            ErrorCode.CHECKSUM_MISMATCH,
            f"{name}: file changed since it was added",
            details={"name": name, "expected": row.sha256, "actual": digest, "path": str(path)},
            hint=f"rbee-hive models rm {name} && rbee-hive models add {row.ref}",
        )
    await asyncio.to_thread(read_gguf_info, path)
    return {"name": name, "ok": True, "path": str(path), "size": row.size, "sha256": digest}
