"""The keeper's side of the connection holder: one socket exchange through it, starting it if needed.

`SshTransport.unix_exchange` comes here first when the keeper holds connections
(`RBEE_SSH_PERSIST`, on by default). Anything that goes wrong on this machine —
an unsafe directory, a holder that will not start or breaks off — raises
`HolderUnavailable`, and the transport connects directly instead; an error from
the node itself (unreachable, host key changed, no hive) is raised as the
keeper would have raised it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from rbee_control.inventory.model import Node
from rbee_control.ssh.held_paths import (
    HolderUnavailable,
    checked_dir,
    control_socket,
    holder_dir,
    persist_seconds,
)
from rbee_control.ssh.held_wire import ExchangeReply, ExchangeRequest

#: seconds a freshly started holder has to start listening
START_TIMEOUT = 10.0
START_POLL = 0.02
#: the holder's log is started afresh past this size
LOG_MAX = 1 << 20
#: started holders, kept so their Popen objects are not collected (and warned about) while they run
_spawned: list[subprocess.Popen[bytes]] = []


class ConnectionHolder:
    """Socket exchanges through the holder in `directory`, which keeps connections `persist` seconds."""

    def __init__(self, directory: Path, persist: float) -> None:
        self.directory, self.persist = directory, persist
        self.unavailable: str | None = None
        self._spawn_lock = asyncio.Lock()
        self._spawned = False

    @classmethod
    def from_env(cls) -> ConnectionHolder | None:
        """The holder `$RBEE_SSH_PERSIST` and `$RBEE_SSH_PERSIST_DIR` ask for; None when off."""
        seconds = persist_seconds()
        return cls(holder_dir(), seconds) if seconds > 0 else None

    async def exchange(
        self, node: Node, known_hosts: Path, connect_timeout: float, path: str, request: bytes, limit: int
    ) -> bytes:
        """What the node's socket at `path` answers to `request` (RbeeError for the node's own errors)."""
        req = ExchangeRequest.for_node(node, str(known_hosts), connect_timeout, path, request, limit)
        reader, writer = await self._open(limit)
        try:
            writer.write(req.to_line())
            await writer.drain()
            line = await reader.readline()
        except (OSError, ValueError) as exc:
            raise self._broken(f"exchange failed: {exc}") from None
        finally:
            writer.close()
        try:
            reply = ExchangeReply.from_line(line)
        except ValueError as exc:
            raise self._broken(f"the holder answered {line[:80]!r}: {exc}") from None
        if reply.error is not None:
            raise reply.error
        return reply.reply or b""

    async def _open(self, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.unavailable is not None:
            raise HolderUnavailable(self.unavailable)
        try:
            path = str(control_socket(checked_dir(self.directory)))
        except HolderUnavailable as exc:
            raise self._broken(str(exc)) from None
        line_limit = limit * 4 // 3 + 64 * 1024  # base64 and the JSON around it
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                return await asyncio.open_unix_connection(path, limit=line_limit)
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            except OSError as exc:
                raise self._broken(f"{path}: {exc.strerror}") from None
            async with self._spawn_lock:
                if not self._spawned:
                    self._spawned = True
                    self._spawn()
            if time.monotonic() > deadline:
                log = self.directory / "holder.log"
                why = f"the connection holder did not start within {START_TIMEOUT:g} s (see {log})"
                raise self._broken(why)
            await asyncio.sleep(START_POLL)

    def _spawn(self) -> None:
        log_path = self.directory / "holder.log"
        if log_path.exists() and log_path.stat().st_size > LOG_MAX:
            log_path.unlink()
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            module = "rbee_control.ssh.held_daemon"
            argv = [sys.executable, "-m", module, str(self.directory), f"{self.persist:g}"]
            _spawned.append(
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    cwd="/",
                    start_new_session=True,  # Ctrl-C in the keeper's terminal is not meant for it
                    close_fds=True,
                )
            )
        except OSError as exc:
            raise self._broken(f"cannot start the connection holder: {exc}") from None
        finally:
            os.close(log)

    def _broken(self, why: str) -> HolderUnavailable:
        """Remember that this run goes direct (one failed look per run, not one per node)."""
        self.unavailable = why
        return HolderUnavailable(why)
