"""The daemon's duties towards its workers: spawn, watch, idle them out, stop them all.

Three things change a worker's fate, and all of them land here:
- its own process (an exit noticed at once for our children, by pid for adopted ones),
- its ready callback (`loading` → `idle`, or failed with the worker's reason),
- the loops: health (dead pid / 3 failed probes / stuck loading) and activity
  (busy or idle from `/metrics`; idle past `idle_timeout` → graceful shutdown).
Stopping is always the same ladder: ask over HTTP, wait, SIGTERM, SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import httpx

from rbee_worker.model_shape import read_model_shape
from rbee_worker.protocol.client import WorkerClient
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.hive_api import ReadyReport
from rbee_worker.protocol.spawn import SpawnRequest

from . import spawn, tls
from .catalog import Catalog
from .config import HiveConfig
from .devices import detect
from .paths import HivePaths
from .pidfiles import WorkerFile, read_worker_files
from .placement import Placement, choose_device, place, reserve_loading, runtime_request
from .process import is_alive, terminate, wait_gone
from .registry import Registry, Worker, WorkerState
from .rpc_servers import RpcRecord, RpcServers, check_rpc_servers, lost_rpc_servers

log = logging.getLogger("rbee.hive")

_PORT_RETRIES = 3


class Supervisor:
    def __init__(self, paths: HivePaths, config: HiveConfig) -> None:
        self.paths = paths
        self.config = config
        self.registry = Registry()
        self.catalog = Catalog(paths.db)
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(5.0, connect=2.0), verify=tls.client_verify(paths.tls_dir)
        )
        self._spawn_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping: dict[str, asyncio.Task[str]] = {}
        self._closing: asyncio.Future[None] | None = None
        self.rpc = RpcServers(paths, config)

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        await self.adopt()
        await self.rpc.clean_leftovers()
        self._background(self._loop(self.config.health_interval, self.check_health))
        self._background(self._loop(self.config.poll_interval, self.check_activity))
        self._background(self._loop(min(self.config.poll_interval, self.config.rpc_grace / 2), self.rpc.reap))

    async def close(self) -> None:
        """Cascade: every worker is stopped before the daemon exits (a second call joins the first)."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.stop_all("hive shutting down")  # split workers first, then the RPC servers
        await self.rpc.stop_all("hive shutting down")
        await self.http.aclose()

    def _background(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _loop(self, interval: float, step: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await step()
            except Exception:
                log.exception("supervisor step %s failed", step.__name__)

    # --- spawn -----------------------------------------------------------------

    async def spawn(self, req: SpawnRequest) -> Worker:
        model = self.catalog.require(req.model)
        rpc_free = await asyncio.to_thread(check_rpc_servers, req.rpc_servers) if req.rpc_servers else None
        worker = await self._launch_bound(req, model, rpc_free)
        if req.wait:
            await self.wait_ready(worker, req.timeout or self.config.loading_timeout)
        return worker

    def client(self, worker: Worker | WorkerFile) -> WorkerClient:
        f = worker.file if isinstance(worker, Worker) else worker
        return WorkerClient(f.url, f.api_key, http=self.http)

    async def place(self, req: SpawnRequest, model: Any, rpc_free: int | None = None) -> Placement:
        """Runtime, device and memory plan from `detect` and the GGUF header; refusals raise here.

        `rpc_free`: a split worker's RPC servers' free memory (`check_rpc_servers`).
        """
        node = await asyncio.to_thread(detect, self.paths)
        wanted = runtime_request(node, req.runtime, req.backend)
        choose_device(node, req.backend, req.device, wanted)  # a missing GPU first: it is the bigger news
        runtime = spawn.choose_runtime(wanted, model)
        shape = await asyncio.to_thread(read_model_shape, model.path)
        placement = place(
            reserve_loading(node, [w.file for w in self.registry.list() if w.state == WorkerState.LOADING]),
            shape,
            runtime=runtime,
            backend=req.backend,
            device=req.device,
            gpu_layers=req.gpu_layers,
            slots=req.slots,
            ctx=req.ctx_size,
            ram_headroom=self.config.ram_factor,
            model=model.name,
            rpc_free=rpc_free,
            cache_type=req.cache_type,
        )
        for warning in placement.warnings:
            log.warning("%s: %s", model.name, warning)
        return placement

    async def _launch_bound(self, req: SpawnRequest, model: Any, rpc_free: int | None) -> Worker:
        """Place, launch and wait until the worker's port answers; retry another port if it lost a bind race.

        Placing and registering happen under one lock: the next spawn's plan then
        counts this worker's memory as taken (see `reserve_loading`).
        """
        skip: set[int] = set()
        placement: Placement | None = None
        for _ in range(_PORT_RETRIES):
            async with self._spawn_lock:
                if placement is None:
                    placement = await self.place(req, model, rpc_free)
                port = spawn.pick_port(self.config, self.registry.ports() | self.rpc.ports() | skip)
                worker_id = spawn.new_worker_id()
                log_start = spawn.log_size(self.paths, worker_id)
                record, proc = await spawn.launch(
                    self.paths, self.config, req, model, placement, worker_id, port
                )
                worker = Worker(file=record, process=proc, idle_timeout=req.idle_timeout)
                self.registry.add(worker)
            plan = placement.plan
            log.info(
                "spawned %s (pid %d) for %s on %s: %s on %s%s, %d/%d layers offloaded, plan %d MB",
                worker_id,
                proc.pid,
                model.name,
                record.url,
                placement.runtime,
                placement.backend,
                "" if placement.device is None else f":{placement.device}",
                plan.gpu_layers,
                plan.n_layers + 1,
                plan.total_bytes >> 20,
            )
            self._background(self._watch_exit(worker))
            answered = await self._wait_http(worker)
            if answered is True:
                return worker
            tail = spawn.log_tail(self.paths, worker_id)
            lost = "address already in use" in spawn.log_since(self.paths, worker_id, log_start).lower()
            if answered is None or lost:
                log.warning("%s lost port %d to another process; trying the next one", worker_id, port)
                skip.add(port)
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.kill()  # it may yet win the port once the other server lets go
                await self._forget(worker)
                continue
            if self.registry.get(worker.id) is worker:
                await self.stop_worker(worker.id, "did not start")
            err = worker.error or {"code": ErrorCode.WORKER_CRASHED, "message": "its port never answered"}
            raise RbeeError(
                err["code"],
                f"worker {worker_id} failed to start: {err['message']}",
                status=500,
                details={"id": worker_id, "log": str(self.paths.worker_log(worker_id)), "log_tail": tail},
                hint=f"tail {self.paths.worker_log(worker_id)}",
            )
        raise RbeeError(ErrorCode.NO_PORT_AVAILABLE, "lost the race for a port three times")

    async def _wait_http(self, worker: Worker) -> bool | None:
        """True once the worker answers as itself; None when another server holds its port.

        `/v1/ready` and not `/health`: a worker that lost its bind to another server
        (a second hive on this host, say) would otherwise be taken for the winner,
        whose public `/health` answers too — but only ours accepts this worker's key.
        """
        deadline = time.monotonic() + self.config.startup_timeout
        client = self.client(worker)
        while time.monotonic() < deadline:
            if worker.settled.is_set():
                return worker.error is None
            if worker.process is not None and worker.process.returncode is not None:
                return False
            try:
                answer = await client.ready(timeout=1.0)
            except RbeeError:
                return None  # the key was refused: someone else's server
            except httpx.HTTPError:
                answer = None
            if answer is not None:
                # ready or still loading, it is ours only if it names this worker
                return True if answer.worker_id == worker.id else None
            await asyncio.sleep(0.05)
        return False

    async def wait_ready(self, worker: Worker, timeout: float) -> None:
        """Block until the worker left `loading`; raise its failure, or LOADING_TIMEOUT (and stop it)."""
        try:
            await asyncio.wait_for(worker.settled.wait(), timeout)
        except TimeoutError:
            await self.stop_worker(worker.id, f"still loading after {timeout:g} s")
            raise RbeeError(
                ErrorCode.LOADING_TIMEOUT,
                f"worker {worker.id} still loading after {timeout:g} s; stopped",
                details={"id": worker.id, "log": str(self.paths.worker_log(worker.id))},
                hint=f"tail {self.paths.worker_log(worker.id)}",
            ) from None
        if worker.error is not None:
            err = worker.error
            raise RbeeError(
                err.get("code") or ErrorCode.WORKER_CRASHED,
                f"worker {worker.id} failed: {err.get('message')}",
                status=500,
                details={"id": worker.id, **(err.get("details") or {})},
                hint=f"tail {self.paths.worker_log(worker.id)}",
            )

    def on_ready(self, report: ReadyReport) -> Worker:
        """The worker's callback: loaded (→ idle) or failed (keeps the reason for whoever waits)."""
        worker = self.registry.require(report.worker_id)
        if report.ready:
            now = time.time()
            worker.state, worker.ready_at, worker.last_activity = WorkerState.IDLE, now, now
            if report.runtime:
                worker.file.runtime = report.runtime
            if report.vram_bytes is not None:
                worker.file.vram_bytes = report.vram_bytes
            worker.file.embedding = report.embedding  # what it serves, in its own words
            log.info(
                "%s ready (%s, %s on %s, %d MB VRAM) after %.2f s",
                worker.id,
                worker.file.model,
                worker.file.runtime,
                worker.file.backend,
                worker.file.vram_bytes >> 20,
                now - worker.file.started_at,
            )
        else:
            err = report.error
            worker.error = {
                "code": err.code if err is not None else ErrorCode.MODEL_LOAD_FAILED,
                "message": (err.message if err is not None else "") or "load failed",
                "details": {"log_tail": spawn.log_tail(self.paths, worker.id)},
            }
            log.warning("%s failed to load: %s", worker.id, worker.error["message"])
            self._background(self.stop_worker(worker.id, "failed to load"))
        worker.settled.set()
        return worker

    # --- death and stopping ----------------------------------------------------

    async def _watch_exit(self, worker: Worker) -> None:
        assert worker.process is not None
        code = await worker.process.wait()
        if self.registry.get(worker.id) is worker and worker.id not in self._stopping:
            self._record_death(worker, f"exited with code {code}")

    async def rpc_start(self, threads: int | None) -> RpcRecord:
        """An RPC server for a split worker elsewhere, on a port no worker of ours holds."""

        def pick(skip: set[int]) -> int:
            return spawn.pick_port(self.config, self.registry.ports() | self.rpc.ports() | skip)

        async with self._spawn_lock:
            return await self.rpc.start(threads, pick)

    def _record_death(self, worker: Worker, why: str) -> None:
        if worker.file.rpc_servers:  # llama.cpp aborts the process (SIGABRT) when an RPC server goes away
            why += f" (a split worker over RPC servers {', '.join(worker.file.rpc_servers)})"
            worker.error = worker.error or {
                "code": ErrorCode.RPC_SERVER_UNREACHABLE,
                "message": f"split worker {why}",
                "details": {"log_tail": spawn.log_tail(self.paths, worker.id)},
            }
        if worker.state == WorkerState.LOADING and worker.error is None:
            worker.error = {
                "code": ErrorCode.WORKER_CRASHED,
                "message": f"process {why} while loading",
                "details": {"log_tail": spawn.log_tail(self.paths, worker.id)},
            }
        log.warning("%s removed: %s", worker.id, why)
        worker.settled.set()
        self.registry.remove(worker.id)
        worker.file.remove(self.paths)

    async def _forget(self, worker: Worker) -> None:
        if worker.process is not None:
            await worker.process.wait()
        self.registry.remove(worker.id)
        worker.file.remove(self.paths)

    async def stop_worker(self, worker_id: str, reason: str, ask: bool = True) -> str:
        """Stop one worker (a second call joins the first); return how it ended.

        `ask=False` skips the HTTP request for a worker that stopped answering.
        """
        task = self._stopping.get(worker_id)
        if task is None:
            worker = self.registry.require(worker_id)
            task = asyncio.create_task(self._stop(worker, reason, ask))
            self._stopping[worker_id] = task
            task.add_done_callback(lambda _: self._stopping.pop(worker_id, None))
        return await asyncio.shield(task)

    async def _stop(self, worker: Worker, reason: str, ask: bool) -> str:
        f = worker.file
        log.info("stopping %s (pid %d): %s", worker.id, f.pid, reason)
        worker.state = WorkerState.DRAINING
        how = await stop_worker_process(self.http, f, self.config.stop_timeout, ask)
        if worker.process is not None:
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(worker.process.wait(), 5.0)
        if worker.error is None and not worker.settled.is_set():
            worker.error = {"code": ErrorCode.WORKER_CRASHED, "message": f"stopped: {reason}"}
        worker.settled.set()
        self.registry.remove(worker.id)
        f.remove(self.paths)
        log.info("%s stopped (%s)", worker.id, how)
        return how

    async def stop_all(self, reason: str) -> int:
        workers = self.registry.list()
        if workers:
            log.info("shutting down %d workers...", len(workers))
        results = await asyncio.gather(
            *(self.stop_worker(w.id, reason) for w in workers), return_exceptions=True
        )
        for w, r in zip(workers, results, strict=True):
            if isinstance(r, BaseException) and not isinstance(r, RbeeError):
                log.error("stopping %s failed: %r", w.id, r)
        if workers:
            log.info("all workers stopped")
        return len(workers)

    # --- loops -----------------------------------------------------------------

    async def check_health(self) -> None:
        """A dead pid or N failed `/health` probes remove a worker; so does loading past the timeout."""
        now = time.time()
        probed = []
        for worker in self.registry.list():
            if worker.id in self._stopping:
                continue
            if not is_alive(worker.file.pid, worker.file.create_time):
                self._record_death(worker, "process is gone")
            elif (
                worker.state == WorkerState.LOADING
                and now - worker.file.started_at > self.config.loading_timeout
            ):
                worker.error = {"code": ErrorCode.LOADING_TIMEOUT, "message": "loading timed out"}
                self._background(self.stop_worker(worker.id, f"loading > {self.config.loading_timeout:g} s"))
            else:
                probed.append(worker)
        probed = [w for w in probed if not await self._rpc_lost(w)]
        answers = await asyncio.gather(*(self._probe(w) for w in probed))
        for worker, ok in zip(probed, answers, strict=True):
            starting = (
                worker.state == WorkerState.LOADING
                and now - worker.file.started_at < self.config.startup_timeout
            )
            if not ok and starting:
                continue  # a process still importing its runtime has not bound its port yet
            worker.failed_probes = 0 if ok else worker.failed_probes + 1
            if worker.failed_probes >= self.config.failed_probes_limit and worker.id not in self._stopping:
                reason = f"{worker.failed_probes} failed health probes"
                self._background(self.stop_worker(worker.id, reason, ask=False))

    async def _rpc_lost(self, worker: Worker) -> bool:
        """A loaded split worker whose RPC server closed its connection is stopped now, not mid-request."""
        if not worker.file.rpc_servers or worker.state not in (WorkerState.IDLE, WorkerState.BUSY):
            return False
        lost = await asyncio.to_thread(lost_rpc_servers, worker.file.pid, worker.file.rpc_servers)
        if not lost:
            return False
        why = f"RPC server {', '.join(lost)} is gone"
        worker.error = {"code": ErrorCode.RPC_SERVER_UNREACHABLE, "message": f"split worker stopped: {why}"}
        log.warning("%s: %s; stopping the split worker", worker.id, why)
        self._background(self.stop_worker(worker.id, why, ask=False))
        return True

    async def _probe(self, worker: Worker) -> bool:
        return await self.client(worker).health(timeout=min(5.0, max(0.2, self.config.health_interval)))

    async def check_activity(self) -> None:
        """Busy or idle from each worker's metrics; idle past the timeout → graceful shutdown."""
        now = time.time()
        for worker in self.registry.list():
            if worker.state not in (WorkerState.IDLE, WorkerState.BUSY) or worker.id in self._stopping:
                continue
            if not await self._poll_metrics(worker):
                continue  # unknown activity never counts as idle
            limit = worker.idle_timeout if worker.idle_timeout is not None else self.config.idle_timeout
            if worker.state == WorkerState.IDLE and worker.idle_for(now) > limit:
                self._background(self.stop_worker(worker.id, f"idle for {worker.idle_for(now):.0f} s"))

    async def _poll_metrics(self, worker: Worker) -> bool:
        try:
            load = await self.client(worker).load()
        except (httpx.HTTPError, RbeeError, ValueError) as exc:
            log.debug("%s: metrics unavailable: %s", worker.id, exc)
            return False
        worker.slots_busy = load.slots_busy
        if load.slots_busy > 0:
            worker.state, worker.last_activity = WorkerState.BUSY, time.time()
        else:
            worker.state = WorkerState.IDLE
            worker.last_activity = max(worker.last_activity, load.last_token_at)
        return True

    # --- restart ---------------------------------------------------------------

    async def adopt(self) -> None:
        """Rebuild the registry from worker files: keep only workers that prove they are alive.

        Probes run concurrently and the unresponsive are stopped in the background, so a
        restart with wedged workers still starts serving within seconds.
        """
        await asyncio.gather(*(self._adopt(record) for record in read_worker_files(self.paths)))

    async def _adopt(self, record: WorkerFile) -> None:
        worker = Worker(file=record)
        if not is_alive(record.pid, record.create_time):
            log.info("%s: pid %d is gone; dropping its record", record.id, record.pid)
            record.remove(self.paths)
            return
        state = await self._probe_ready(worker)
        self.registry.add(worker)
        if state is None:
            self._background(self.stop_worker(record.id, "unresponsive after hive restart", ask=False))
            return
        worker.state = state
        if state == WorkerState.IDLE:
            worker.ready_at = time.time()
            worker.settled.set()
        log.info("%s adopted (%s, %s)", record.id, record.model, state)

    async def _probe_ready(self, worker: Worker) -> WorkerState | None:
        client = self.client(worker)
        if not await client.health():
            return None
        try:
            ready = await client.ready()
        except (httpx.HTTPError, RbeeError):
            return None
        if ready.http_status == 200:
            return WorkerState.IDLE
        if ready.http_status == 503 and ready.state == "loading":
            return WorkerState.LOADING
        return None


async def stop_worker_process(http: httpx.AsyncClient, f: WorkerFile, grace: float, ask: bool = True) -> str:
    """The stop ladder: ask over HTTP (the worker finishes its running request), wait, SIGTERM, SIGKILL.

    Each wait is `grace` seconds, so a stop is bounded by about twice that.
    """
    if not is_alive(f.pid, f.create_time):
        return "exited"
    if ask:
        with contextlib.suppress(httpx.HTTPError, RbeeError):
            await WorkerClient(f.url, f.api_key, http=http).shutdown(timeout=2.0)
        if await wait_gone(f.pid, f.create_time, grace):
            return "graceful"
    return await terminate(f.pid, f.create_time, term_grace=grace)
