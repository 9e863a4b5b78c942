"""`rbee-keeper models search hf:owner/repo`: a repo's quantizations, their sizes, and the default.

Asked from the keeper's machine (its HF_ENDPOINT and HF_TOKEN), before anything is
downloaded: it shows what `hf:owner/repo` would pick and the tags `hf:owner/repo:TAG` takes.
"""

from __future__ import annotations

import argparse

from rbee_control.hive.hf_files import choose
from rbee_control.hive.models import resolve_retried
from rbee_control.hive.refs import hf_quants, parse_ref
from rbee_worker.protocol.errors import ErrorCode, RbeeError

from .context import KeeperContext
from .display import human_bytes, table


async def cmd_models_search(args: argparse.Namespace, ctx: KeeperContext) -> int:
    ref = parse_ref(args.ref)
    if ref.kind != "hf" or ref.filename is not None or ref.tag is not None:
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"models search takes a Hugging Face repo, not {args.ref!r}",
            hint="rbee-keeper models search hf:TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF",
        )
    quants = await resolve_retried(ref, lambda: hf_quants(ref))
    default = choose(quants, ref.raw)[0] if quants else None
    rows = [
        [
            q.tag or "?",
            human_bytes(q.size),
            f"{len(q.files)} parts" if len(q.files) > 1 else "",
            q.primary,
            "default" if q is default else "",
        ]
        for q in quants
    ]
    payload = {
        "repo": ref.location,
        "default": default.primary if default else None,
        "quantizations": [q.to_json() for q in quants],
    }
    human = (
        table(f"hf:{ref.location}", ["tag", "size", "split", "file", ""], rows)
        if quants
        else f"hf:{ref.location} has no .gguf files"
    )
    ctx.display.result(payload, human)
    return 0 if quants else 1
