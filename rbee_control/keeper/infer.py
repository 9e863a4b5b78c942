"""`rbee-keeper infer`: from a prompt to streamed tokens on one node.

Phases: (1) a worker this keeper already knows, checked over HTTP only;
(2) the node's hive, started if needed; (3) an idle worker the hive already runs;
(4) the model, provisioned if the node lacks it; (5) a new worker, waited for until
ready; (6) tokens streamed from the worker over HTTP/SSE to stdout; (7) a summary.
SSH is used only when phase 1 finds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx

from rbee_control.hive import tls
from rbee_control.inventory.model import Inventory, Node
from rbee_control.node.client import NodeClient
from rbee_worker.protocol.client import DEFAULT_TIMEOUT, WorkerClient
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.hive_api import WorkerInfo
from rbee_worker.protocol.request import InferenceRequest
from rbee_worker.protocol.spawn import SpawnRequest

from .display import Display, NodeProgress
from .known_workers import KnownWorker, KnownWorkers
from .provision import catalog_name, ensure_model
from .stream import BUSY_RETRIES, StreamResult, stream_inference

T = TypeVar("T")

#: `--max-tokens` unset: generate until end-of-sequence; the worker caps it at what is left of the context
UNTIL_EOS = 1_000_000


@dataclass
class InferOptions:
    node: str
    model: str
    prompt: str
    max_tokens: int = UNTIL_EOS
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    #: how to start a worker when none serves the model (its `model` is the catalog name)
    spawn: SpawnRequest | None = None
    name: str | None = None
    partial_dir: Path | None = None
    raw: bool = False
    #: how often a busy worker is asked again (EC6)
    busy_retries: int = BUSY_RETRIES


class Phases:
    """Wall time per phase, for the summary line and `--json`."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + (now - self._last)
        self._last = now


async def infer(inventory: Inventory, options: InferOptions, display: Display) -> dict[str, Any]:
    node = inventory.node(options.node)
    raw_request = {
        "prompt": options.prompt,
        "max_tokens": options.max_tokens,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "top_k": options.top_k,
        "seed": options.seed,
    }
    request = InferenceRequest.from_json(raw_request)
    model_name = catalog_name(options.model, options.name)
    known = KnownWorkers()
    phases = Phases()
    pins = tls.pinned_context()  # https workers: only the certificates read from their hive over SSH
    async with httpx.AsyncClient(timeout=DEFAULT_TIMEOUT, verify=pins) as http:
        worker = await ready_worker(http, pins, known, inventory, node, options, display, phases)
        if worker.chat_template and not options.raw:
            # one user turn; the worker renders it with the model's own template
            chat = {**raw_request, "prompt": None, "messages": [{"role": "user", "content": options.prompt}]}
            request = InferenceRequest.from_json(chat)
        result = await _stream(http, worker, request, display, options, known)
        phases.mark("stream")
    phases_s = {k: round(v, 3) for k, v in phases.times.items()}
    summary: dict[str, Any] = {
        "node": node.name,
        "model": model_name,
        "worker": worker.id,
        "url": worker.url,
        "tokens": result.tokens_out,
        "prompt_tokens": (result.end or {}).get("prompt_tokens"),
        "ttft_ms": round(result.ttft_ms or 0.0, 1),
        "tokens_per_second": round(result.tokens_per_second or 0.0, 1),
        "stop_reason": (result.end or {}).get("stop_reason"),
        "phases_s": phases_s,
        "text": "".join(result.text),
    }
    display.narrate(
        f"\n[dim]{summary['tokens']} tokens, TTFT {summary['ttft_ms']} ms, "
        f"{summary['tokens_per_second']} tokens/s, {summary['stop_reason']} "
        f"({', '.join(f'{k} {v:.2f}s' for k, v in phases_s.items())})[/dim]"
    )
    return summary


async def ready_worker(
    http: httpx.AsyncClient,
    pins: ssl.SSLContext,
    known: KnownWorkers,
    inventory: Inventory,
    node: Node,
    options: InferOptions,
    display: Display,
    phases: Phases,
) -> KnownWorker:
    """A ready worker for the model: one this keeper knows (HTTP only), else the hive's (over SSH)."""
    model_name = catalog_name(options.model, options.name)
    worker = await _known_ready_worker(http, known, node, model_name, pins)
    phases.mark("reuse")
    if worker is None:
        worker = await _provision_worker(inventory, node, options, model_name, display, phases)
        known.remember(worker)
        if worker.tls_certificate:
            tls.pin(pins, worker.tls_certificate)
    else:
        display.narrate(f"[dim]using worker {worker.id} at {worker.url}[/dim]")
    return worker


async def _known_ready_worker(
    http: httpx.AsyncClient, known: KnownWorkers, node: Node, model: str, pins: ssl.SSLContext
) -> KnownWorker | None:
    for worker in known.find(node.name, model):
        try:
            if worker.tls_certificate:  # checked alone: a pin that fails must not stay trusted in `pins`
                async with httpx.AsyncClient(verify=tls.pinned_context(worker.tls_certificate)) as alone:
                    ready = (await WorkerClient(worker.url, worker.api_key, alone).ready(timeout=2)).ok
                if ready:
                    tls.pin(pins, worker.tls_certificate)
            else:
                ready = (await WorkerClient(worker.url, worker.api_key, http).ready(timeout=2)).ok
            if ready:
                return worker
        except (httpx.HTTPError, RbeeError):
            pass
        known.forget(node.name, worker.id)
    return None


async def _provision_worker(
    inventory: Inventory, node: Node, options: InferOptions, model: str, display: Display, phases: Phases
) -> KnownWorker:
    from rbee_control.ssh.pool import TransportPool  # asyncssh: imported only when SSH is needed

    async with TransportPool(inventory) as pool:
        client = NodeClient(node, await pool.get(node))
        phases.mark("connect")
        status = display.err.status(f"starting the hive on {node.name}")
        with status if not display.json_mode else contextlib.nullcontext():
            await client.hive_start()
        phases.mark("hive")
        with NodeProgress(display) as progress:
            catalog_entry = await ensure_model(client, options.model, progress, name=model)
            phases.mark("provision")
            template = catalog_entry.chat_template
            for entry in await client.worker_list():
                if entry.model == model and entry.state in ("idle", "ready") and entry.api_key:
                    display.narrate(f"[dim]reusing worker {entry.id} on {node.name}[/dim]")
                    return _known(node, model, entry, template, await _certificate(client, entry, display))
            display.narrate(f"[dim]starting a worker for {model} on {node.name}[/dim]")
            label = f"{node.name}: load {model}"
            progress.update(label, 0, None, in_bytes=False)
            spawn = options.spawn or SpawnRequest(model)
            spawned = await client.worker_spawn(
                replace(spawn, model=model, wait=True), progress=progress.on_event(node.name)
            )
            progress.update(label, 1, 1, in_bytes=False)
        phases.mark("spawn")
        if spawned.state not in ("idle", "ready"):
            raise RbeeError(ErrorCode.MODEL_LOAD_FAILED, f"worker did not become ready: {spawned.public()}")
        return _known(node, model, spawned, template, await _certificate(client, spawned, display))


async def _certificate(client: NodeClient, entry: WorkerInfo, display: Display) -> str | None:
    """For an https worker, its hive's certificate, read over the (host-key pinned) SSH channel."""
    if not entry.url.startswith("https:"):
        return None
    info = await client.hive_tls()
    pem = str(info.get("certificate", ""))
    if not pem or tls.fingerprint(pem) != info.get("fingerprint"):
        raise RbeeError(
            ErrorCode.INTERNAL_ERROR, f"node {client.node.name}: certificate and fingerprint differ"
        )
    display.narrate(f"[dim]pinned the worker certificate of {client.node.name}: {info['fingerprint']}[/dim]")
    return pem


def _known(
    node: Node, model: str, entry: WorkerInfo, chat_template: str | None, certificate: str | None
) -> KnownWorker:
    if not entry.api_key:
        raise RbeeError(ErrorCode.INTERNAL_ERROR, f"node {node.name} gave worker {entry.id} without its key")
    return KnownWorker(
        node=node.name,
        model=model,
        id=entry.id,
        url=entry.url,
        api_key=entry.api_key,
        runtime=entry.runtime,
        chat_template=chat_template,
        tls_certificate=certificate,
    )


async def _stream(
    http: httpx.AsyncClient,
    worker: KnownWorker,
    request: InferenceRequest,
    display: Display,
    options: InferOptions,
    known: KnownWorkers,
) -> StreamResult:
    def write(text: str) -> None:
        if not display.json_mode:
            sys.stdout.write(text)
            sys.stdout.flush()

    def busy(delay: float) -> None:
        unit = "second" if delay == 1 else "seconds"
        display.narrate(f"[yellow]Worker is busy, retrying in {delay:g} {unit}...[/yellow]")

    try:
        client = WorkerClient(worker.url, worker.api_key, http)
        result = await stream_inference(
            client, request, write, on_busy=busy, busy_retries=options.busy_retries
        )
    except RbeeError as exc:
        if exc.code == ErrorCode.WORKER_CRASHED:
            known.forget(worker.node, worker.id)
            received = exc.details.get("partial_text", "")
            if received:
                saved = _save_partial(options, received)
                exc.details["saved_to"] = str(saved)
                exc.hint = f"the {len(received)} characters received so far are saved in {saved}"
        raise
    if not display.json_mode:
        sys.stdout.write("\n")
    return result


def _save_partial(options: InferOptions, text: str) -> Path:
    state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    directory = options.partial_dir or Path(state_home) / "rbee"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"partial-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    path.write_text(text)
    return path


def read_prompt(value: str) -> str:
    """`--prompt -` reads the prompt from stdin (a pipe or a file), as `ollama run` does."""
    if value != "-":
        return value
    text = sys.stdin.read()
    if not text.strip():
        raise RbeeError(
            ErrorCode.INVALID_REQUEST, "--prompt -: stdin was empty", hint="echo hello | rbee-keeper …"
        )
    return text


async def within(seconds: float | None, work: Coroutine[Any, Any, T]) -> T:
    """`--timeout`: the whole command, cancelled (the worker gets its DELETE) when the time is up."""
    if seconds is None:
        return await work
    if seconds <= 0:
        work.close()
        raise RbeeError(ErrorCode.INVALID_REQUEST, "--timeout must be positive")
    try:
        async with asyncio.timeout(seconds):
            return await work
    except TimeoutError:
        raise RbeeError(
            ErrorCode.REQUEST_TIMEOUT,
            f"no complete answer within {seconds:g} s; the request was cancelled",
            details={"timeout_s": seconds},
            hint="raise --timeout, or lower --max-tokens",
        ) from None
