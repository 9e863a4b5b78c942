"""`queen-rbee`: serve the OpenAI-compatible router; `run_queen` is also what `rbee-keeper serve` calls.

    queen-rbee [--inventory PATH | --no-inventory] [--host 127.0.0.1] [--port 8080]
               [--api-key KEY]   (or $RBEE_QUEEN_API_KEY, preferred: argv is visible in `ps`)

With an inventory (`--inventory`, `$RBEE_INVENTORY` or the per-user one; never
the current directory's) the queen offers every model of every node and starts workers on
demand; without one it routes only to workers registered with
`POST /v2/workers/register`. SIGTERM/SIGINT: running streams get a grace period,
then everything the queen started is stopped (bounded) and it exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from types import FrameType

import uvicorn
import uvloop

from rbee_worker.app.server import KEEP_ALIVE_S, bind_socket
from rbee_worker.protocol.errors import RbeeError

from .app import create_app
from .fleet import Fleet, StaticFleet
from .router import RouterSettings
from .state import QueenSettings

API_KEY_ENV = "RBEE_QUEEN_API_KEY"
GRACE_SECONDS = 10

log = logging.getLogger("rbee.queen")


@dataclass(frozen=True, slots=True)
class QueenOptions:
    """Everything `run_queen` needs; `inventory=None` means "look for one", `static` means "do not"."""

    inventory: str | None = None
    static: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    settings: QueenSettings = field(default_factory=QueenSettings)
    log_level: str = "info"


class QueenServer(uvicorn.Server):
    """First SIGTERM/SIGINT: stop accepting, give streams a grace period, stop the fleet; second: now.

    uvicorn re-raises the signal after a graceful exit (so the process dies of it);
    the queen instead returns its exit code: 0 after SIGTERM, 130 after Ctrl-C.
    """

    stopped_by: int | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True
            return
        self.stopped_by = sig
        self.should_exit = True


def build_fleet(options: QueenOptions) -> Fleet:
    if options.static:
        return StaticFleet()
    from rbee_control.inventory.loader import find_inventory

    from .inventory_fleet import InventoryFleet

    try:
        path = find_inventory(options.inventory)
    except RbeeError:
        if options.inventory:
            raise
        log.info("no inventory found: serving registered workers only")
        return StaticFleet()
    log.info("inventory: %s", path)
    return InventoryFleet.from_inventory(path)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_queen(options: QueenOptions) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit code (0, or 1 with a one-line cause)."""
    logging.basicConfig(
        level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream request is noise
    try:
        fleet = build_fleet(options)
        sock = bind_socket(options.host, options.port)
    except RbeeError as exc:
        print(f"queen-rbee: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  try: {exc.hint}", file=sys.stderr)
        return 1
    if not options.api_key and not _is_loopback(options.host):
        log.warning("listening on %s without an API key: anyone who can reach it can use it", options.host)
    app = create_app(fleet, api_key=options.api_key, settings=options.settings)
    server = QueenServer(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=GRACE_SECONDS,
            # Longer than clients keep idle connections (httpx and the openai SDK: 5 s, uvicorn's
            # own default too): the client closes first, so no request races the server's close.
            timeout_keep_alive=KEEP_ALIVE_S,
            lifespan="on",
        )
    )
    port = sock.getsockname()[1]
    log.info(
        "queen-rbee on http://%s:%d (OpenAI base URL http://%s:%d/v1)", options.host, port, options.host, port
    )
    uvloop.run(server.serve(sockets=[sock]))
    return 130 if server.stopped_by == signal.SIGINT else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="queen-rbee", description="OpenAI-compatible router over rbee workers"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--inventory", help="inventory.yaml (default: $RBEE_INVENTORY, else the per-user one)"
    )
    source.add_argument("--no-inventory", action="store_true", help="route to registered workers only")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", help=f"bearer key clients must send (prefer ${API_KEY_ENV})")
    parser.add_argument("--queue-limit", type=int, default=64, help="requests waiting per model (default 64)")
    parser.add_argument(
        "--queue-timeout", type=float, default=120.0, help="longest wait for a busy worker, s"
    )
    parser.add_argument(
        "--cold-start-timeout", type=float, default=600.0, help="longest wait for a new worker, s"
    )
    parser.add_argument("--health-interval", type=float, default=15.0, help="seconds between worker probes")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.queue_limit < 1 or args.queue_timeout <= 0 or args.cold_start_timeout <= 0:
        print("queen-rbee: queue limit and timeouts must be positive", file=sys.stderr)
        return 2
    settings = QueenSettings(
        router=RouterSettings(args.queue_limit, args.queue_timeout, args.cold_start_timeout),
        health_interval=args.health_interval,
    )
    options = QueenOptions(
        inventory=args.inventory,
        static=args.no_inventory,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        settings=settings,
        log_level=args.log_level,
    )
    try:
        return run_queen(options)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
