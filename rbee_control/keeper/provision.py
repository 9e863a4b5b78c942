"""Make sure a node has a model: reuse its catalog entry, push a local file, or let it download.

`file:` refs name a file on the keeper's machine: for a local node the hive
imports it in place; for an SSH node the keeper pushes it over SFTP (resuming a
partial upload) and the hive imports the pushed copy. `hf:` and `https:` refs are
downloaded by the node itself, its progress streamed back as events.

A pushed file is hashed on both ends: the keeper hashes what it reads and the
hive refuses a copy whose sha256 differs. A resume trusts the remote prefix by
its size only, so a refused resumed copy is pushed once more from the start.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from rbee_control.hive.paths import check_model_name
from rbee_control.hive.refs import file_ref
from rbee_control.node.client import NodeClient
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.hive_api import ModelInfo

from .display import NodeProgress

REF_SCHEMES = ("file:", "hf:", "https:", "http:")
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


def is_ref(model: str) -> bool:
    return model.startswith(REF_SCHEMES)


def default_name(ref: str) -> str:
    """The catalog name a ref gets when none is given: its file name without `.gguf`."""
    tail = ref.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    name = _NAME_OK.sub("-", tail.removesuffix(".gguf")).strip("-.") or "model"
    return name[:128]


def catalog_name(model: str, name: str | None = None) -> str:
    """The name `model` (a catalog name or a ref) has, or will have, in a node's catalog."""
    return name or (default_name(model) if is_ref(model) else model)


def local_file(ref: str) -> Path:
    """The keeper-side file a `file:` ref names (percent-decoded once, as the hive decodes)."""
    path = Path(unquote(ref[len("file:") :].removeprefix("//"))).expanduser()
    if not path.is_file():
        raise RbeeError(
            ErrorCode.MODEL_NOT_FOUND, f"{path}: no such file on this machine", details={"path": str(path)}
        )
    return path.resolve()


async def ensure_model(
    client: NodeClient,
    model: str,
    progress: NodeProgress,
    name: str | None = None,
    sha256: str | None = None,
    max_bytes: int | None = None,
) -> ModelInfo:
    """The node's catalog entry for `model` (a name or a ref), provisioning it if needed."""
    wanted = catalog_name(model, name)
    if is_ref(model):
        check_model_name(wanted)  # before any byte is pushed: the hive would refuse it anyway
    for entry in await client.models_list(templates=True):
        if entry.name == wanted:
            if is_ref(model):
                _check_same_model(entry, model, sha256)
            return entry
    if not is_ref(model):
        raise RbeeError(
            ErrorCode.MODEL_NOT_FOUND,
            f"model {model!r} is not on node {client.node.name}",
            hint="rbee-keeper models add hf:OWNER/REPO:FILE.gguf "
            f"--name {shlex.quote(model)} --node {shlex.quote(client.node.name)}",
        )
    on_event = progress.on_event(client.node.name)
    if not model.startswith("file:"):
        return await client.models_add(
            model, name=wanted, sha256=sha256, progress=on_event, max_bytes=max_bytes
        )
    source = local_file(model)
    if client.node.is_local:
        return await client.models_add(file_ref(source), name=wanted, sha256=sha256, progress=on_event)
    return await push_model(client, source, wanted, sha256, progress)


async def push_model(
    client: NodeClient, source: Path, name: str, sha256: str | None, progress: NodeProgress
) -> ModelInfo:
    """Push `source` and have the hive import it, checking the sha256 the keeper read."""
    transport = await client.transport()
    target = await incoming_path(client, name)
    for resume in (True, False):
        if not resume:
            await transport.run(["rm", "-f", target], timeout=30)
        put = await transport.put(source, target, _bar(client, source, progress), resume=resume)
        if sha256 and put.sha256 != sha256.lower():
            raise RbeeError(
                ErrorCode.CHECKSUM_MISMATCH,
                f"{source} has sha256 {put.sha256}, not the expected {sha256}",
                details={"path": str(source), "expected": sha256.lower(), "actual": put.sha256},
                hint="check the --sha256 value, or the file",
            )
        try:
            return await client.models_add(
                file_ref(target), name=name, sha256=put.sha256, progress=progress.on_event(client.node.name)
            )
        except RbeeError as exc:
            if exc.code != ErrorCode.CHECKSUM_MISMATCH or not put.resumed_from:
                raise
            progress.note(
                f"[yellow]![/yellow] {client.node.name}: the resumed copy of {source.name} differs; "
                "pushing it again from the start"
            )
    raise AssertionError("unreachable")


def _check_same_model(entry: ModelInfo, ref: str, sha256: str | None) -> None:
    """A name already in the catalog may only be "added" again for the same file."""
    if sha256 and entry.sha256 and sha256.lower() != entry.sha256:
        raise RbeeError(
            ErrorCode.CHECKSUM_MISMATCH,
            f"model {entry.name!r} on this node has sha256 {entry.sha256}, not {sha256}",
            status=409,
            hint="choose another --name, or remove the old one first: rbee-keeper models rm NAME --node NODE",
        )
    if ref.startswith("file:"):
        size = local_file(ref).stat().st_size
        same = size == entry.size
    else:
        same = ref == entry.ref
    if not same:
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"the name {entry.name!r} is already used on this node by {entry.ref}",
            status=409,
            hint="choose another --name, or remove the old one first: rbee-keeper models rm NAME --node NODE",
        )


def _bar(client: NodeClient, source: Path, progress: NodeProgress) -> Callable[[int, int], None]:
    label = f"{client.node.name}: push {source.name}"
    return lambda done, total: progress.update(label, done, total)


async def incoming_path(client: NodeClient, name: str) -> str:
    """`<home>/incoming/<name>.gguf` on the node (absolute), its directory created.

    Named after the catalog name, not the source file, so a resume only ever
    continues a push of the same model; the hive moves the file out on import.
    """
    transport, node = await client.transport(), client.node
    base = node.home
    if base.startswith("~"):
        base = (await remote_home(client)) + base[1:]
    incoming = f"{base}/incoming"
    mkdir = await transport.run(["mkdir", "-p", incoming], timeout=30)
    if not mkdir.ok:
        raise RbeeError(ErrorCode.INTERNAL_ERROR, f"cannot create {incoming} on {node.name}: {mkdir.stderr}")
    return f"{incoming}/{check_model_name(name)}.gguf"


async def remote_home(client: NodeClient) -> str:
    result = await (await client.transport()).run(["printenv", "HOME"], timeout=30)
    home = result.stdout.strip() if result.ok else ""
    if not home.startswith("/"):
        raise RbeeError(ErrorCode.INTERNAL_ERROR, f"cannot find the home directory on {client.node.name}")
    return home
