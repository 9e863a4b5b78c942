"""`rbee-worker`: serve one GGUF model over HTTP/SSE, or write the tiny test model."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .logfile import WORKER_LOG_ENV, log_to
from .planning import BACKENDS as DEVICE_BACKENDS
from .planning import GpuLayers, parse_gpu_layers
from .protocol.errors import RbeeError
from .protocol.spawn import CACHE_TYPES, DEFAULT_CACHE_TYPE
from .runtimes import BACKENDS

API_KEY_ENV = "RBEE_WORKER_API_KEY"


def _gpu_layers(text: str) -> GpuLayers:
    try:
        return parse_gpu_layers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _endpoints(text: str) -> tuple[str, ...]:
    from .protocol.rpc import parse_endpoint

    items = tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        for item in items:
            parse_endpoint(item)
    except RbeeError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return items


def _weights(text: str) -> tuple[float, ...]:
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if any(not w >= 0 for w in weights) or not any(w > 0 for w in weights):  # `not >=` also refuses nan
        raise argparse.ArgumentTypeError(f"weights must be >= 0 and not all 0, got {text!r}")
    return weights


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbee-worker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rbee-worker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model over HTTP/SSE")
    serve.add_argument("--model", required=True, help="path to a .gguf file")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8081)
    serve.add_argument(
        "--api-key", help=f"bearer token clients must send (prefer ${API_KEY_ENV}: argv is visible in ps)"
    )
    serve.add_argument("--runtime", default="auto", choices=["auto", *BACKENDS], help="the GGUF runtime")
    serve.add_argument(
        "--backend",
        default="auto",
        choices=["auto", *DEVICE_BACKENDS, *BACKENDS],
        help="where to run: auto (a GPU the runtime can drive, else cpu), cpu, cuda, metal "
        "(a runtime name here still selects the runtime)",
    )
    serve.add_argument("--device", type=int, help="GPU index as the node numbers it (default 0)")
    serve.add_argument(
        "--gpu-layers",
        type=_gpu_layers,
        default="auto",
        help="layers to offload: auto (as many as fit the device's free memory), all, or a number",
    )
    serve.add_argument(
        "--slots",
        type=int,
        default=1,
        help="concurrent generations (llama-cpp: batched on one model copy; ctransformers: one copy each)",
    )
    serve.add_argument("--queue", type=int, default=8, help="requests allowed to wait for a slot")
    serve.add_argument(
        "--ctx-size",
        "--ctx",
        dest="ctx",
        type=int,
        help="context tokens per slot (default: the model's own, at most 4096)",
    )
    serve.add_argument("--threads", type=int, help="runtime threads (default: half the cores)")
    serve.add_argument("--worker-id", default="worker")
    serve.add_argument("--callback-url", help="POST the load outcome here")
    serve.add_argument("--callback-uds", help="reach --callback-url over this Unix socket")
    serve.add_argument("--failed-linger", type=float, default=5.0, help="seconds to report a failed load")
    serve.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    serve.add_argument("--ssl-keyfile", help="the certificate's private key (PEM)")
    serve.add_argument(
        "--head-timeout", type=float, default=10.0, help="seconds a client has to send a request head"
    )
    serve.add_argument("--max-connections", type=int, default=1024, help="open client connections at most")
    serve.add_argument(
        "--embedding",
        action="store_true",
        help="serve POST /v1/embeddings (llama.cpp pooling) instead of text generation",
    )
    serve.add_argument(
        "--pooling",
        default="auto",
        choices=["auto", "mean", "cls", "last"],
        help="with --embedding: how token states become one vector (auto: the model's own, else mean)",
    )
    serve.add_argument(
        "--sse-keepalive",
        type=float,
        default=10.0,
        help="seconds between ': ping' comments on a stream waiting for a slot",
    )

    serve.add_argument(
        "--cache-type",
        default=DEFAULT_CACHE_TYPE,
        choices=CACHE_TYPES,
        help="KV cache type: f16 (llama.cpp's default), q8_0 (half the memory), q4_0 (llama-cpp only)",
    )
    serve.add_argument(
        "--rpc",
        type=_endpoints,
        default=(),
        help="host:port,... of llama.cpp RPC servers to place layers on (a split worker; llama-cpp only)",
    )
    serve.add_argument(
        "--tensor-split",
        type=_weights,
        default=(),
        help="layer share per device, e.g. 1,1 (default: by each device's free memory)",
    )

    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight llama GGUF for tests")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if os.environ.get(WORKER_LOG_ENV):  # under a hive: its rotating file, not the inherited stderr
        log_to(os.environ[WORKER_LOG_ENV])
    if args.command == "tiny-model":
        from .tinymodel import write_tiny_model

        print(write_tiny_model(args.path, seed=args.seed))
        return 0

    from .app import WorkerConfig, serve

    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    if not api_key:
        print(f"rbee-worker: an API key is required (--api-key or ${API_KEY_ENV})", file=sys.stderr)
        return 2
    for name in ("slots", "queue", "ctx", "threads", "device"):
        value = getattr(args, name)
        if value is not None and value < (0 if name in ("queue", "device") else 1):
            flag = "ctx-size" if name == "ctx" else name
            print(f"rbee-worker: --{flag} must be positive", file=sys.stderr)
            return 2
    if args.head_timeout <= 0 or args.max_connections < 1 or args.sse_keepalive <= 0:
        print(
            "rbee-worker: --head-timeout, --max-connections and --sse-keepalive must be positive",
            file=sys.stderr,
        )
        return 2
    runtime, backend = args.runtime, args.backend
    if backend in BACKENDS:  # before --runtime existed, --backend named the runtime
        runtime, backend = (backend if runtime == "auto" else runtime), "auto"
    from .runtimes.device_choice import pin_visible_device

    pin_visible_device(backend, args.device)
    config = WorkerConfig(
        model_path=args.model,
        api_key=api_key,
        host=args.host,
        port=args.port,
        runtime=runtime,
        backend=backend,
        device=args.device,
        gpu_layers=args.gpu_layers,
        slots=args.slots,
        queue=args.queue,
        ctx=args.ctx,
        threads=args.threads,
        worker_id=args.worker_id,
        callback_url=args.callback_url,
        callback_uds=args.callback_uds,
        failed_linger_s=args.failed_linger,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        head_timeout_s=args.head_timeout,
        max_connections=args.max_connections,
        rpc_servers=args.rpc,
        tensor_split=args.tensor_split,
        cache_type=args.cache_type,
        embedding=args.embedding,
        pooling=args.pooling,
        keepalive_s=args.sse_keepalive,
    )
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        print("rbee-worker: --ssl-certfile and --ssl-keyfile go together", file=sys.stderr)
        return 2
    try:
        return serve(config)
    except RbeeError as exc:
        print(f"rbee-worker: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
