"""Everything one queen app shares between requests, and the knobs that bound it."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from .access import HostPolicy
from .catalog import ModelCatalog
from .fleet import Fleet
from .keepalive import DEFAULT_INTERVAL
from .metrics import QueenMetrics
from .recent import RecentRequests
from .registration import RegistrationPolicy
from .relay import Relay, RelaySettings, Upstream
from .router import Router, RouterSettings
from .upstreams import Upstreams
from .workers import WorkerTable


@dataclass(frozen=True, slots=True)
class QueenSettings:
    router: RouterSettings = field(default_factory=RouterSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    #: Seconds between health probes of every worker (failures are probed at once anyway).
    health_interval: float = 15.0
    #: Seconds between probes of each upstream engine (`GET <url>/models`).
    upstream_interval: float = 15.0
    #: How long the fleet's model list is reused before asking the nodes again.
    catalog_ttl: float = 30.0
    #: Longest silence from a worker (time to first token included); long prompts on CPUs are slow.
    upstream_read_timeout: float = 300.0
    upstream_connect_timeout: float = 5.0
    #: Keep-alive connections kept open to workers (all loopback or LAN).
    max_keepalive: int = 64
    max_connections: int = 512
    #: Bound on stopping what the queen started when it exits.
    shutdown_timeout: float = 30.0
    #: `Host` names the queen answers to (DNS rebinding), and origins allowed CORS (none by default).
    hosts: HostPolicy = field(default_factory=lambda: HostPolicy.for_bind("127.0.0.1"))
    cors_origins: tuple[str, ...] = ()
    #: Which addresses registration may probe, and how many workers the table holds.
    registration: RegistrationPolicy = field(default_factory=RegistrationPolicy)
    #: Seconds between `: ping` comments on an OpenAI stream still waiting for a worker (and the
    #: silence before the first, after which the stream is answered and errors come in-stream).
    sse_keepalive: float = DEFAULT_INTERVAL


@dataclass(eq=False)
class QueenState:
    fleet: Fleet
    settings: QueenSettings
    client: httpx.AsyncClient
    metrics: QueenMetrics
    table: WorkerTable
    catalog: ModelCatalog
    router: Router
    relay: Relay
    api_key: str | None = None
    started_at: float = 0.0
    running: dict[str, Upstream] = field(default_factory=dict)
    #: External engines from the inventory's `upstreams:` (None: the inventory lists none).
    upstreams: Upstreams | None = None
    #: Who started each running native request (`access.CLIENT`, `ADMIN`...): only they may cancel it.
    owners: dict[str, str] = field(default_factory=dict)
    #: the last finished requests, for the dashboard
    recent: RecentRequests = field(default_factory=RecentRequests)

    @classmethod
    def build(
        cls, fleet: Fleet, settings: QueenSettings, api_key: str | None, started_at: float
    ) -> QueenState:
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=settings.upstream_connect_timeout,
                read=settings.upstream_read_timeout,
                write=30.0,
                pool=settings.router.queue_timeout,
            ),
            limits=httpx.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_keepalive,
                keepalive_expiry=30.0,
            ),
            trust_env=False,
            verify=getattr(fleet, "tls_context", True),  # https workers: their hives' certificates
        )
        metrics = QueenMetrics()
        table = WorkerTable(client, metrics)
        router = Router(fleet, table, metrics, settings.router)
        return cls(
            fleet=fleet,
            settings=settings,
            client=client,
            metrics=metrics,
            table=table,
            catalog=ModelCatalog(fleet, table, ttl=settings.catalog_ttl),
            router=router,
            relay=Relay(router, client, metrics, settings.relay),
            api_key=api_key,
            started_at=started_at,
        )
