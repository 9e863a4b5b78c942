"""The queen's two keys: where each comes from, minted into the secrets file on first start.

- client key: `--api-key`, `$RBEE_QUEEN_API_KEY`, else `queen_key` in the secrets file;
  `--insecure-no-auth` goes without one (loopback binds only, checked by the CLI).
- admin key: `--admin-key`, `$RBEE_QUEEN_ADMIN_KEY`, else `queen_admin_key` in the
  secrets file; always on, since it guards registration and the worker table.

The secrets file is the inventory's (`inventory.secrets.json` beside it), or the
per-user one when the queen runs without an inventory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rbee_control.inventory.paths import default_inventory_path
from rbee_control.inventory.secrets import SecretStore, secrets_path_for

from .options import ADMIN_KEY_ENV, API_KEY_ENV

__all__ = ["ADMIN_KEY_ENV", "API_KEY_ENV", "QueenKeys", "read_or_create", "resolve_keys", "secrets_file"]

KINDS = ("client", "admin")


@dataclass(frozen=True, slots=True)
class QueenKeys:
    client: str | None
    admin: str
    #: One line per key taken from the secrets file, for stderr: where it is and how to read it.
    notices: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # keys stay out of logs and tracebacks
        return f"QueenKeys(client={'set' if self.client else None}, admin=set)"


def secrets_file(inventory: Path | None) -> Path:
    """The secrets file the queen's keys live in."""
    return secrets_path_for(inventory if inventory is not None else default_inventory_path())


def show_key_command(kind: str, inventory: Path | None) -> str:
    where = f" --inventory {inventory}" if inventory is not None else " --no-inventory"
    return f"queen-rbee{where} --show-key {kind}"


def read_or_create(kind: str, inventory: Path | None) -> tuple[str, bool]:
    """(the key of `kind` from the secrets file, whether it was minted just now)."""
    store = SecretStore(secrets_file(inventory))
    if kind == "client":
        existing = store.queen_key()
        return existing or store.get_or_create_queen_key(), existing is None
    existing = store.queen_admin_key()
    return existing or store.get_or_create_queen_admin_key(), existing is None


def resolve_keys(
    inventory: Path | None, *, api_key: str | None, admin_key: str | None, insecure_no_auth: bool
) -> QueenKeys:
    """Both keys, from flags, the environment, or the secrets file (RbeeError if that file is unusable)."""
    notices: list[str] = []
    path = secrets_file(inventory)

    def from_file(kind: str, header: str) -> str:
        key, created = read_or_create(kind, inventory)
        verb = "created" if created else "read"
        notices.append(
            f"{kind} key {verb}: {path} (mode 0600); clients of this plane send `{header}`; "
            f"print it with: {show_key_command(kind, inventory)}"
        )
        return key

    client = api_key or os.environ.get(API_KEY_ENV) or None
    if client is None and not insecure_no_auth:
        client = from_file("client", "Authorization: Bearer <client key>")
    admin = admin_key or os.environ.get(ADMIN_KEY_ENV) or None
    if admin is None:
        admin = from_file("admin", "Authorization: Bearer <admin key>")
    if client is not None and client == admin:
        notices.append("warning: the client key and the admin key are the same; clients can act as admin")
    return QueenKeys(client, admin, notices)
