"""`queen-rbee`: serve the OpenAI-compatible router; `run_queen` is also what `rbee-keeper serve` calls.

    queen-rbee [--inventory PATH | --no-inventory] [--host 127.0.0.1] [--port 8080]
               [--api-key KEY] [--admin-key KEY]   (or $RBEE_QUEEN_API_KEY / $RBEE_QUEEN_ADMIN_KEY)
               [--insecure-no-auth] [--cors-origin ORIGIN]… [--allowed-host NAME]…
               [--register-network CIDR]… [--head-timeout 10] [--max-connections 1024]
    queen-rbee [--inventory PATH | --no-inventory] --show-key client|admin

Both keys default to the secrets file beside the inventory (minted on first start;
stderr says where). With an inventory (`--inventory`, `$RBEE_INVENTORY` or the
per-user one; never the current directory's) the queen offers every model of every node
and starts workers on demand; without one it routes only to workers registered with
`POST /v2/workers/register`. SIGTERM/SIGINT: running streams get a grace period,
then everything the queen started is stopped (bounded) and it exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import uvicorn

from rbee_control.inventory.upstreams import Upstream
from rbee_worker import __version__
from rbee_worker.app import event_loop
from rbee_worker.app.connections import ConnectionLimits, guarded_protocol
from rbee_worker.app.server import KEEP_ALIVE_S, bind_socket
from rbee_worker.protocol.errors import RbeeError

from .access import HostPolicy
from .app import create_app
from .fleet import Fleet, StaticFleet
from .keys import ADMIN_KEY_ENV, API_KEY_ENV, KINDS, read_or_create, resolve_keys
from .options import access_options, add_access_arguments
from .registration import RegistrationPolicy
from .replicas import ReplicaSettings
from .router import RouterSettings
from .state import QueenSettings

__all__ = ["ADMIN_KEY_ENV", "API_KEY_ENV", "QueenOptions", "add_access_arguments", "main", "run_queen"]

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
    admin_key: str | None = None
    insecure_no_auth: bool = False
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    register_networks: tuple[str, ...] = ()
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    settings: QueenSettings = field(default_factory=QueenSettings)
    log_level: str = "info"
    #: `text` or `json` (one object per line)
    log_format: str = "text"

    def __repr__(self) -> str:  # keys stay out of logs and tracebacks
        return f"QueenOptions(inventory={self.inventory!r}, host={self.host!r}, port={self.port})"


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


def locate_inventory(options: QueenOptions) -> Path | None:
    """The inventory to serve, or None (registered workers only)."""
    if options.static:
        return None
    from rbee_control.inventory.loader import find_inventory

    try:
        return find_inventory(options.inventory)
    except RbeeError:
        if options.inventory:
            raise
        log.info("no inventory found: serving registered workers only")
        return None


def build_fleet(inventory: Path | None) -> Fleet:
    if inventory is None:
        return StaticFleet()
    from .inventory_fleet import InventoryFleet

    log.info("inventory: %s", inventory)
    return InventoryFleet.from_inventory(inventory)


def load_upstreams(inventory: Path | None) -> tuple[list[Upstream], dict[str, str | None]]:
    """The inventory's external engines, and each one's key from the secrets file (None: no key)."""
    if inventory is None:
        return [], {}
    from rbee_control.inventory.loader import load_inventory
    from rbee_control.inventory.secrets import SecretStore

    upstreams = load_inventory(inventory).upstreams
    store = SecretStore.beside(inventory)
    for upstream in upstreams.values():
        log.info("upstream %s: %s", upstream.name, upstream.url)
    return list(upstreams.values()), {name: store.upstream_key(name) for name in upstreams}


def node_addresses(inventory: Path | None) -> list[str]:
    if inventory is None:
        return []
    from rbee_control.inventory.loader import load_inventory

    return [node.address for node in load_inventory(inventory)]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _fail(exc: RbeeError) -> int:
    print(f"queen-rbee: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"  try: {exc.hint}", file=sys.stderr)
    return 1


def secure_settings(options: QueenOptions, inventory: Path | None) -> QueenSettings:
    """The operator's access choices folded into the settings (ValueError: a bad CIDR)."""
    registration = RegistrationPolicy.build(
        node_addresses(inventory),
        options.register_networks,
        allow_loopback=_is_loopback(options.host),
        max_workers=options.settings.registration.max_workers,
    )
    return dataclasses.replace(
        options.settings,
        hosts=HostPolicy.for_bind(options.host, options.allowed_hosts),
        cors_origins=options.cors_origins,
        registration=registration,
    )


def run_queen(options: QueenOptions) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit code (0, or 1 with a one-line cause)."""
    from .log_format import configure

    configure(options.log_level, options.log_format)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream request is noise
    if options.insecure_no_auth and not _is_loopback(options.host):
        print(
            f"queen-rbee: refusing --insecure-no-auth on {options.host}: without a client key only a "
            "loopback address (127.0.0.1, ::1, localhost) may be bound",
            file=sys.stderr,
        )
        return 1
    try:
        inventory = locate_inventory(options)
        keys = resolve_keys(
            inventory,
            api_key=options.api_key,
            admin_key=options.admin_key,
            insecure_no_auth=options.insecure_no_auth,
        )
        settings = secure_settings(options, inventory)
        fleet = build_fleet(inventory)
        upstreams, upstream_keys = load_upstreams(inventory)
        sock = bind_socket(options.host, options.port)
    except RbeeError as exc:
        return _fail(exc)
    except ValueError as exc:
        print(f"queen-rbee: {exc}", file=sys.stderr)
        return 2
    for notice in keys.notices:
        print(f"queen-rbee: {notice}", file=sys.stderr)
    if keys.client is None:
        log.warning("--insecure-no-auth: the client plane takes requests without a key (loopback only)")
    app = create_app(
        fleet,
        api_key=keys.client,
        admin_key=keys.admin,
        settings=settings,
        upstreams=upstreams,
        upstream_keys=upstream_keys,
    )
    server = QueenServer(
        uvicorn.Config(
            app,
            http=guarded_protocol(options.limits),
            limit_concurrency=options.limits.uvicorn_concurrency,
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
    event_loop.run(server.serve(sockets=[sock]))
    return 130 if server.stopped_by == signal.SIGINT else 0


def show_key(options: QueenOptions, kind: str) -> int:
    """Print one key from the secrets file (minting it if it is not there yet)."""
    try:
        key, _created = read_or_create(kind, locate_inventory(options))
    except RbeeError as exc:
        return _fail(exc)
    print(key)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="queen-rbee", description="OpenAI-compatible router over rbee workers"
    )
    parser.add_argument("--version", action="version", version=f"queen-rbee {__version__}")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--inventory", help="inventory.yaml (default: $RBEE_INVENTORY, else the per-user one)"
    )
    source.add_argument("--no-inventory", action="store_true", help="route to registered workers only")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    add_access_arguments(parser)
    parser.add_argument("--show-key", choices=KINDS, help="print a key from the secrets file and exit")
    parser.add_argument("--queue-limit", type=int, default=64, help="requests waiting per model (default 64)")
    parser.add_argument(
        "--queue-timeout", type=float, default=120.0, help="longest wait for a busy worker, s"
    )
    parser.add_argument(
        "--cold-start-timeout", type=float, default=600.0, help="longest wait for a new worker, s"
    )
    parser.add_argument("--health-interval", type=float, default=15.0, help="seconds between worker probes")
    parser.add_argument(
        "--sse-keepalive",
        type=float,
        default=10.0,
        help="seconds between ': ping' comments on a stream still waiting for a worker (default 10)",
    )
    parser.add_argument(
        "--catalog-ttl",
        type=float,
        default=30.0,
        help="seconds the model listing is served before it is refreshed in the background (default 30)",
    )
    parser.add_argument(
        "--scale-after",
        type=float,
        default=2.0,
        help="seconds a request waits for a slot before another replica starts (replicas.max > 1)",
    )
    parser.add_argument(
        "--replica-idle-timeout",
        type=float,
        default=300.0,
        help="seconds an extra replica idles before it stops",
    )
    parser.add_argument(
        "--replica-interval",
        type=float,
        default=5.0,
        help="seconds between checks of replicas.min and idle extras",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="json: one object a line"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    replica_knobs = (args.scale_after, args.replica_idle_timeout, args.replica_interval)
    if (
        args.queue_limit < 1
        or args.queue_timeout <= 0
        or args.cold_start_timeout <= 0
        or min(replica_knobs) <= 0
    ):
        print("queen-rbee: queue limit and timeouts must be positive", file=sys.stderr)
        return 2
    if args.sse_keepalive <= 0 or args.catalog_ttl < 0:
        print("queen-rbee: --sse-keepalive must be positive and --catalog-ttl not negative", file=sys.stderr)
        return 2
    try:
        access = access_options(args)
    except ValueError as exc:
        print(f"queen-rbee: {exc}", file=sys.stderr)
        return 2
    settings = QueenSettings(
        router=RouterSettings(
            args.queue_limit,
            args.queue_timeout,
            args.cold_start_timeout,
            ReplicaSettings(args.scale_after, args.replica_idle_timeout, args.replica_interval),
        ),
        health_interval=args.health_interval,
        sse_keepalive=args.sse_keepalive,
        catalog_ttl=args.catalog_ttl,
    )
    options = QueenOptions(
        inventory=args.inventory,
        static=args.no_inventory,
        host=args.host,
        port=args.port,
        settings=settings,
        log_level=args.log_level,
        log_format=args.log_format,
        **access,
    )
    if args.show_key:
        return show_key(options, args.show_key)
    try:
        return run_queen(options)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
