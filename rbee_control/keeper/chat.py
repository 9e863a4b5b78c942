"""`rbee-keeper chat --node NAME --model M`: an interactive multi-turn session, as `ollama run` gives.

The whole history goes with every turn (workers are stateless); `/bye` or end of
input leaves; Ctrl-C while an answer streams cancels that answer (the worker gets
its DELETE) and keeps the session; Ctrl-C at the prompt only says how to leave.
A cancelled answer is not kept in the history.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any

import httpx

from rbee_control.hive import tls
from rbee_worker.protocol.client import DEFAULT_TIMEOUT, WorkerClient
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.request import InferenceRequest
from rbee_worker.protocol.spawn import SpawnRequest

from .context import KeeperContext
from .infer import UNTIL_EOS, InferOptions, Phases, ready_worker
from .known_workers import KnownWorkers
from .provision import catalog_name
from .stream import stream_inference

BYE = "/bye"


async def cmd_chat(args: argparse.Namespace, ctx: KeeperContext) -> int:
    display = ctx.display
    node = ctx.inventory.node(args.node)
    options = InferOptions(
        node=args.node,
        model=args.model,
        prompt="",
        name=args.name,
        spawn=SpawnRequest.from_args(args, model=catalog_name(args.model, args.name), wait=True),
    )
    pins = tls.pinned_context()
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT, verify=pins) as http:
        worker = await ready_worker(
            http, pins, KnownWorkers(), ctx.inventory, node, options, display, Phases()
        )
        client = WorkerClient(worker.url, worker.api_key, http)
        sampling: dict[str, Any] = {
            "max_tokens": args.max_tokens or UNTIL_EOS,
            "temperature": args.temperature,
            "seed": args.seed,
        }
        history: list[dict[str, str]] = []
        if args.system:
            history.append({"role": "system", "content": args.system})
        display.narrate(f"[dim]chatting with {options.model} on {node.name}; {BYE} to leave[/dim]")
        turns = 0
        while (line := await _read_line()) is not None:
            text = line.strip()
            if text == BYE:
                break
            if not text:
                continue
            history.append({"role": "user", "content": text})
            answer = await _answer(client, {**sampling, "messages": history})
            if answer is None:
                history.pop()  # cancelled: the question is asked again or replaced
                display.narrate("\n[yellow]cancelled[/yellow]")
                continue
            history.append({"role": "assistant", "content": answer})
            turns += 1
    display.narrate(f"[dim]{turns} turns[/dim]")
    display.result({"node": node.name, "model": options.model, "worker": worker.id, "turns": turns})
    return 0


async def _read_line() -> str | None:
    """One line of input (None at its end); Ctrl-C here only reminds how to leave.

    The read stays the same thread across Ctrl-C: a second reader would swallow a line.
    """
    sys.stderr.write(">>> ")
    sys.stderr.flush()
    reading = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, lambda: sys.stderr.write(f"\nUse Ctrl-D or {BYE} to leave.\n>>> "))
    try:
        line = await reading
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    return line or None


async def _answer(client: WorkerClient, body: dict[str, Any]) -> str | None:
    """Stream one answer to stdout; None when Ctrl-C cancelled it."""

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    streaming = asyncio.ensure_future(stream_inference(client, InferenceRequest.from_json(body), write))
    with _sigint_cancels(streaming):
        try:
            result = await streaming
        except asyncio.CancelledError:
            return None
        except RbeeError as exc:
            if exc.code == ErrorCode.WORKER_CRASHED:
                raise
            sys.stderr.write(f"\nerror [{exc.code}]: {exc.message}\n")
            return ""
    sys.stdout.write("\n")
    return "".join(result.text)


@contextlib.contextmanager
def _sigint_cancels(task: asyncio.Future[Any]) -> Any:
    """While inside, Ctrl-C cancels `task` instead of the session."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def register(sub: Any) -> None:
    from rbee_worker.protocol.spawn import add_spawn_arguments

    p = sub.add_parser("chat", help="an interactive conversation with a model on a node (/bye to leave)")
    p.add_argument("--node", default="local")
    p.add_argument("--model", required=True, help="a catalog name on the node, or file:/hf:/https: ref")
    p.add_argument("--name", help="catalog name for a ref (default: its file name)")
    p.add_argument("--system", help="a system message that starts the conversation")
    p.add_argument("--max-tokens", type=int, help="per answer (default: until it ends, at most the context)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int)
    add_spawn_arguments(p, model=False, wait=False)
    p.set_defaults(handler=cmd_chat)
