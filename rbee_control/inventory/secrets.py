"""Per-node worker API tokens and the queen's two keys, kept beside the inventory in a 0600 file.

Secrets never go into `inventory.yaml` (people paste and commit that file). The
secrets file is JSON, written atomically with mode 0600 under an advisory lock so
two keeper runs cannot mint two different tokens for one node, and it is refused
when anyone but its owner could read it, the way ssh refuses a loose private key.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rbee_control.inventory.atomic import atomic_write
from rbee_worker.protocol.errors import ErrorCode, RbeeError

SECRETS_SUFFIX = ".secrets.json"
FORMAT_VERSION = 1
TOKEN_BYTES = 32


def secrets_path_for(inventory_path: str | os.PathLike[str]) -> Path:
    """`inventory.yaml` → `inventory.secrets.json` in the same directory."""
    path = Path(inventory_path)
    return path.with_name(path.stem + SECRETS_SUFFIX)


class SecretStore:
    """Read and mint secrets; every method re-reads the file, so concurrent keepers agree."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def beside(cls, inventory_path: str | os.PathLike[str]) -> SecretStore:
        return cls(secrets_path_for(inventory_path))

    def token(self, node: str) -> str | None:
        """The node's worker API token, if one was ever created."""
        token = self._read().get("node_tokens", {}).get(node)
        return str(token) if token else None

    def get_or_create_token(self, node: str) -> str:
        """The node's worker API token, minting and saving one the first time."""
        return self._get_or_create(lambda data: data.setdefault("node_tokens", {}), node)

    def queen_key(self) -> str | None:
        key = self._read().get("queen_key")
        return str(key) if key else None

    def get_or_create_queen_key(self) -> str:
        """The API key clients present to the queen, minted on first use."""
        return self._get_or_create(lambda data: data, "queen_key")

    def queen_admin_key(self) -> str | None:
        key = self._read().get("queen_admin_key")
        return str(key) if key else None

    def get_or_create_queen_admin_key(self) -> str:
        """The queen's admin-plane key (registration, the worker table), minted on first use."""
        return self._get_or_create(lambda data: data, "queen_admin_key")

    def upstream_key(self, upstream: str) -> str | None:
        """The API key an external engine (`upstreams:` in the inventory) wants, if it wants one."""
        keys = self._read().get("upstream_keys", {})
        if not isinstance(keys, dict):
            raise self._error(f"secrets file {self.path}: upstream_keys must be an object of name → key")
        key = keys.get(upstream)
        return str(key) if key else None

    def set_upstream_key(self, upstream: str, key: str | None) -> None:
        """Store (or with None, remove) an upstream's key; the file stays 0600."""
        with self._locked():
            data = self._read()
            keys = data.setdefault("upstream_keys", {})
            if not isinstance(keys, dict):
                raise self._error(f"secrets file {self.path}: upstream_keys must be an object of name → key")
            if key:
                keys[upstream] = key
            else:
                keys.pop(upstream, None)
            self._write(data)

    def forget_node(self, node: str) -> bool:
        """Drop a removed node's token; True if there was one."""
        with self._locked():
            data = self._read()
            if node not in data.get("node_tokens", {}):
                return False
            del data["node_tokens"][node]
            self._write(data)
            return True

    # -- file handling --------------------------------------------------------------

    def _get_or_create(self, section: Callable[[dict[str, Any]], dict[str, Any]], key: str) -> str:
        existing = section(self._read()).get(key)
        if existing:
            return str(existing)
        with self._locked():
            data = self._read()
            table = section(data)
            if not table.get(key):
                table[key] = secrets.token_urlsafe(TOKEN_BYTES)
                self._write(data)
            return str(table[key])

    def _read(self) -> dict[str, Any]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return {"version": FORMAT_VERSION}
        except OSError as exc:
            raise self._error(f"cannot open secrets file {self.path}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as fh:
            self._check_private(os.fstat(fh.fileno()))
            raw = fh.read()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._error(f"secrets file {self.path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise self._error(f"secrets file {self.path} is not a JSON object")
        return data

    def _check_private(self, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise self._error(f"secrets file {self.path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise self._error(
                f"secrets file {self.path} belongs to uid {st.st_uid}, not to you",
                hint=f"chown {os.geteuid()} {self.path}",
            )
        loose = st.st_mode & 0o077
        if loose:
            raise self._error(
                f"secrets file {self.path} is readable by group or others (mode {st.st_mode & 0o777:04o}); "
                "refusing to use it",
                hint=f"chmod 600 {self.path}",
            )

    def _write(self, data: dict[str, Any]) -> None:
        data["version"] = FORMAT_VERSION
        payload = json.dumps(data, indent=2, sort_keys=True) + "\n"
        atomic_write(self.path, payload.encode("utf-8"), mode=0o600)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Advisory lock on a sidecar file (the secrets file itself is replaced on every write)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _error(message: str, hint: str | None = None) -> RbeeError:
        return RbeeError(ErrorCode.INVENTORY_INVALID, message, hint=hint)
