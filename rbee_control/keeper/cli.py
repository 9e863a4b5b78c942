"""`rbee-keeper`: the operator's command line.

Exit codes: 0 ok, 1 error (one line of cause and a command to try), 2 usage,
130 Ctrl-C (after the remote request was cancelled). Tokens go to stdout;
narration and progress to stderr; `--json` prints machine output on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from rbee_control import __version__
from rbee_control.queen.options import add_access_arguments
from rbee_worker.protocol.errors import RbeeError
from rbee_worker.protocol.spawn import SpawnRequest, add_spawn_arguments

from .context import KeeperContext
from .display import Display

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

Handler = Callable[[argparse.Namespace, KeeperContext], Coroutine[Any, Any, int]]


async def cmd_infer(args: argparse.Namespace, ctx: KeeperContext) -> int:
    from .infer import UNTIL_EOS, InferOptions, infer, read_prompt, within
    from .provision import catalog_name

    options = InferOptions(
        node=args.node,
        model=args.model,
        prompt=read_prompt(args.prompt),
        max_tokens=UNTIL_EOS if args.max_tokens is None else args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        spawn=SpawnRequest.from_args(args, model=catalog_name(args.model, args.name), wait=True),
        name=args.name,
        raw=args.raw,
        busy_retries=args.retry,
    )
    summary = await within(args.timeout, infer(ctx.inventory, options, ctx.display))
    ctx.display.result(summary)
    return EXIT_OK


def _add_infer(sub: Any) -> None:
    p = sub.add_parser("infer", help="stream an answer from a model on a node")
    p.add_argument("--node", default="local")
    p.add_argument("--model", required=True, help="a catalog name on the node, or file:/hf:/https: ref")
    p.add_argument("--name", help="catalog name for a ref (default: its file name)")
    p.add_argument("--prompt", required=True, help="the prompt; '-' reads it from stdin")
    p.add_argument("--max-tokens", type=int, help="default: until the answer ends (at most the context)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int)
    add_spawn_arguments(p, model=False, wait=False, embedding=False)  # infer generates text
    p.add_argument("--raw", action="store_true", help="send the prompt as is, not as a chat turn")
    p.add_argument("--retry", type=int, default=3, help="busy worker: ask again N times (1, 2, 4 s…)")
    p.add_argument("--timeout", type=float, help="give up (and cancel the request) after this many seconds")
    p.set_defaults(handler=cmd_infer)


def cmd_serve(args: argparse.Namespace, ctx: KeeperContext) -> int:
    """The queen in this process; blocking, so it bypasses the asyncio entry."""
    from rbee_control.queen.cli import QueenOptions, run_queen
    from rbee_control.queen.options import access_options

    try:
        access = access_options(args)
    except ValueError as exc:
        print(f"rbee-keeper serve: {exc}", file=sys.stderr)
        return 2
    return run_queen(QueenOptions(inventory=args.inventory, host=args.host, port=args.port, **access))


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run queen-rbee, the OpenAI-compatible router, over this inventory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    add_access_arguments(p)
    p.set_defaults(handler=cmd_serve, blocking=True)


def build_parser() -> argparse.ArgumentParser:
    from . import chat, fleet_commands, logs_command, setup_commands

    parser = argparse.ArgumentParser(prog="rbee-keeper", description="drive your rbee fleet")
    parser.add_argument("--version", action="version", version=f"rbee-keeper {__version__}")
    _add_global_options(parser, None, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_infer(sub)
    _add_serve(sub)
    chat.register(sub)
    logs_command.register(sub)
    setup_commands.register(sub)
    fleet_commands.register(sub)
    for command in _leaf_parsers(parser):
        # after the subcommand too (`setup list-nodes --json`); SUPPRESS keeps a value given before it
        _add_global_options(command, argparse.SUPPRESS, argparse.SUPPRESS)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, inventory: Any, json: Any) -> None:
    parser.add_argument(
        "--inventory",
        default=inventory,
        help="inventory file (default: $RBEE_INVENTORY, else ~/.config/rbee/inventory.yaml)",
    )
    parser.add_argument("--json", action="store_true", default=json, help="machine-readable output on stdout")


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser that ends a command line (`infer`, `setup install`, …)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [
        leaf for a in subs for child in dict.fromkeys(a.choices.values()) for leaf in _leaf_parsers(child)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    display = Display(json_mode=args.json)
    ctx = KeeperContext(display, args.inventory)
    handler: Handler = args.handler
    try:
        if getattr(args, "blocking", False):
            return handler(args, ctx)  # type: ignore[return-value]
        return asyncio.run(handler(args, ctx))
    except RbeeError as exc:
        display.error(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        display.narrate("\n[yellow]interrupted[/yellow]")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
