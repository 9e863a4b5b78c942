"""`rbee-worker`: serve one GGUF model over HTTP/SSE, or write the tiny test model."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .protocol.errors import RbeeError
from .runtimes import BACKENDS

API_KEY_ENV = "RBEE_WORKER_API_KEY"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbee-worker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model over HTTP/SSE")
    serve.add_argument("--model", required=True, help="path to a .gguf file")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8081)
    serve.add_argument(
        "--api-key", help=f"bearer token clients must send (prefer ${API_KEY_ENV}: argv is visible in ps)"
    )
    serve.add_argument("--runtime", default="auto", choices=["auto", *BACKENDS], help="GGUF runtime")
    serve.add_argument("--slots", type=int, default=1, help="concurrent generations (one model copy each)")
    serve.add_argument("--queue", type=int, default=8, help="requests allowed to wait for a slot")
    serve.add_argument(
        "--ctx-size", "--ctx", dest="ctx", type=int, help="context length (default: the model's own)"
    )
    serve.add_argument("--threads", type=int, help="runtime threads (default: half the cores)")
    serve.add_argument("--worker-id", default="worker")
    serve.add_argument("--callback-url", help="POST the load outcome here")
    serve.add_argument("--callback-uds", help="reach --callback-url over this Unix socket")
    serve.add_argument("--failed-linger", type=float, default=5.0, help="seconds to report a failed load")
    serve.add_argument(
        "--head-timeout", type=float, default=10.0, help="seconds a client has to send a request head"
    )
    serve.add_argument("--max-connections", type=int, default=1024, help="open client connections at most")

    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight llama GGUF for tests")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def serve_options() -> frozenset[str]:
    """The flags `serve` takes: a hive passes a spawn option on only when this worker knows it."""
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve: argparse.ArgumentParser = commands.choices["serve"]
    return frozenset(opt for action in serve._actions for opt in action.option_strings)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "tiny-model":
        from .tinymodel import write_tiny_model

        print(write_tiny_model(args.path, seed=args.seed))
        return 0

    from .app import WorkerConfig, serve

    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    if not api_key:
        print(f"rbee-worker: an API key is required (--api-key or ${API_KEY_ENV})", file=sys.stderr)
        return 2
    for name in ("slots", "queue", "ctx", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "queue" else 1):
            print(f"rbee-worker: --{name} must be positive", file=sys.stderr)
            return 2
    if args.head_timeout <= 0 or args.max_connections < 1:
        print("rbee-worker: --head-timeout and --max-connections must be positive", file=sys.stderr)
        return 2
    config = WorkerConfig(
        model_path=args.model,
        api_key=api_key,
        host=args.host,
        port=args.port,
        backend=args.runtime,
        slots=args.slots,
        queue=args.queue,
        ctx=args.ctx,
        threads=args.threads,
        worker_id=args.worker_id,
        callback_url=args.callback_url,
        callback_uds=args.callback_uds,
        failed_linger_s=args.failed_linger,
        head_timeout_s=args.head_timeout,
        max_connections=args.max_connections,
    )
    try:
        return serve(config)
    except RbeeError as exc:
        print(f"rbee-worker: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
