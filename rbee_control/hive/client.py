"""Talking to a node's hive daemon over its Unix socket.

Used by the `rbee-hive` CLI on the node, and by anything else running there (the
keeper with `transport: local`, tests). Remote callers run the CLI over SSH
instead and read its JSON lines (`rbee_worker.protocol.node_events`).
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import httpx

from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.hive_api import HiveHealth, HiveShutdown, StopResult, WorkerInfo
from rbee_worker.protocol.rpc import RpcServerInfo, check_rpc_id
from rbee_worker.protocol.spawn import SpawnRequest

from .paths import HivePaths, check_worker_id


def hive_not_running(paths: HivePaths) -> RbeeError:
    return RbeeError(
        ErrorCode.HIVE_NOT_RUNNING,
        f"the hive daemon is not running (no answer on {paths.socket})",
        details={"socket": str(paths.socket)},
        hint=f"rbee-hive daemon --detach --home {paths.home}",
    )


class HiveClient:
    """`async with HiveClient(paths) as hive: await hive.spawn(SpawnRequest("tiny", wait=True))`"""

    def __init__(self, paths: HivePaths, timeout: float = 10.0) -> None:
        self.paths = paths
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(paths.socket)),
            base_url="http://hive",
            timeout=httpx.Timeout(timeout, connect=2.0),
        )

    async def __aenter__(self) -> HiveClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        kwargs: dict[str, Any] = {"json": body} if body is not None else {}
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=2.0)
        try:
            resp = await self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.RemoteProtocolError, FileNotFoundError, ConnectionRefusedError):
            raise hive_not_running(self.paths) from None
        except httpx.TimeoutException as exc:
            raise RbeeError(
                ErrorCode.CONNECTION_TIMEOUT, f"the hive did not answer {method} {path} in time"
            ) from exc
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code >= 400:
            err = RbeeError.from_body(data, status=resp.status_code)
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                err.hint = data["error"].get("hint")
            raise err
        return data

    async def health(self) -> HiveHealth:
        return HiveHealth.from_json(await self._call("GET", "/v1/health", timeout=3.0))

    async def spawn(self, req: SpawnRequest) -> WorkerInfo:
        """Start a worker; with `req.wait`, answer once it is loaded (or failed)."""
        # the daemon waits up to `timeout` (default: its loading timeout) plus start-up
        http_timeout = (req.timeout or 300.0) + 60.0 if req.wait else 60.0
        body = await self._call("POST", "/v1/workers/spawn", req.to_json(), timeout=http_timeout)
        return WorkerInfo.from_json(body)

    async def list_workers(self) -> list[WorkerInfo]:
        body = await self._call("GET", "/v1/workers/list")
        return [WorkerInfo.from_json(w) for w in body["workers"]]

    async def stop_worker(self, worker_id: str) -> StopResult:
        check_worker_id(worker_id)
        return StopResult.from_json(await self._call("POST", f"/v1/workers/{worker_id}/stop", timeout=90.0))

    async def rpc_start(self, threads: int | None = None) -> RpcServerInfo:
        body = {"threads": threads} if threads else {}
        return RpcServerInfo.from_json(await self._call("POST", "/v1/rpc/start", body, timeout=90.0))

    async def rpc_list(self) -> list[RpcServerInfo]:
        body = await self._call("GET", "/v1/rpc/list")
        return [RpcServerInfo.from_json(s) for s in body["servers"]]

    async def rpc_stop(self, rpc_id: str) -> StopResult:
        check_rpc_id(rpc_id)
        return StopResult.from_json(await self._call("POST", f"/v1/rpc/{rpc_id}/stop", timeout=60.0))

    async def shutdown(self) -> HiveShutdown:
        return HiveShutdown.from_json(await self._call("POST", "/v1/admin/shutdown"))


async def wait_for_hive(paths: HivePaths, timeout: float, alive: Any = None) -> HiveHealth:
    """Poll health until the daemon answers; `alive()` returning False aborts early (it died)."""
    deadline = time.monotonic() + timeout
    async with HiveClient(paths, timeout=2.0) as hive:
        while True:
            try:
                return await hive.health()
            except RbeeError as exc:
                if exc.code != ErrorCode.HIVE_NOT_RUNNING:
                    raise
                if time.monotonic() >= deadline or (alive is not None and not alive()):
                    raise
            await asyncio.sleep(0.05)
