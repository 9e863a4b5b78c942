"""The queen's access options, shared by `queen-rbee` and `rbee-keeper serve`.

Import-light on purpose: the keeper builds its parser on every run, and must not
load the server to do it.
"""

from __future__ import annotations

import argparse
from typing import Any

API_KEY_ENV = "RBEE_QUEEN_API_KEY"
ADMIN_KEY_ENV = "RBEE_QUEEN_ADMIN_KEY"
DEFAULT_HEAD_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 1024


def add_access_arguments(parser: argparse.ArgumentParser) -> None:
    """Keys, browsers, registration and slow clients."""
    parser.add_argument(
        "--api-key", help=f"client key (prefer ${API_KEY_ENV}; default: minted into the secrets file)"
    )
    parser.add_argument(
        "--admin-key",
        help=f"admin key for /v2/* (prefer ${ADMIN_KEY_ENV}; default: minted into the secrets file)",
    )
    parser.add_argument(
        "--insecure-no-auth", action="store_true", help="no client key (refused unless bound to loopback)"
    )
    parser.add_argument(
        "--cors-origin", action="append", default=[], metavar="ORIGIN",
        help="allow browser pages from this origin (repeatable; none by default)",
    )  # fmt: skip
    parser.add_argument(
        "--allowed-host", action="append", default=[], metavar="NAME",
        help="a Host name clients use besides the bind address and localhost (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--register-network", action="append", default=[], metavar="CIDR",
        help="workers here may register, besides inventory nodes (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--head-timeout", type=float, default=DEFAULT_HEAD_TIMEOUT,
        help="seconds a client has to send a request head (default 10)",
    )  # fmt: skip
    parser.add_argument(
        "--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
        help="open client connections at most (default 1024)",
    )  # fmt: skip


def access_options(args: argparse.Namespace) -> dict[str, Any]:
    """`QueenOptions` fields from `add_access_arguments` (ValueError: a limit that is not positive)."""
    from rbee_worker.app.connections import ConnectionLimits

    return {
        "api_key": args.api_key or None,
        "admin_key": args.admin_key or None,
        "insecure_no_auth": args.insecure_no_auth,
        "cors_origins": tuple(args.cors_origin),
        "allowed_hosts": tuple(args.allowed_host),
        "register_networks": tuple(args.register_network),
        "limits": ConnectionLimits(head_timeout=args.head_timeout, max_connections=args.max_connections),
    }
