"""External engines (`upstreams:` in the inventory): which models they offer and whether they are up.

Each upstream is probed with `GET <url>/models` at start and every
`interval` seconds. Its models are the inventory's `models` list when given, else
whatever that probe listed (the last good listing is kept while it is down, so
its models answer "upstream down" rather than "no such model"). rbee's own
workers win a name both offer; `upstream/model` always reaches the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import httpx

from rbee_control.inventory.upstreams import MODEL_ID_RE, Upstream
from rbee_worker.protocol.errors import ErrorCode, RbeeError

from .metrics import QueenMetrics

log = logging.getLogger("rbee.queen")

#: More models than any engine serves; a listing past this is cut (and logged).
MAX_MODELS = 1000
PROBE_TIMEOUT = 5.0
MIN_RECHECK = 2.0


@dataclass(eq=False)
class UpstreamState:
    """What the queen knows about one upstream; `up` None until the first probe finished."""

    config: Upstream
    key: str | None = None
    up: bool | None = None
    error: str | None = None
    discovered: tuple[str, ...] = ()
    checked_at: float = float("-inf")

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def models(self) -> tuple[str, ...]:
        return self.config.models if self.config.models is not None else self.discovered

    def to_json(self) -> dict[str, object]:
        """What an operator sees (never the key)."""
        return {
            "name": self.name,
            "url": self.config.url,
            "up": self.up,
            "error": self.error,
            "models": list(self.models),
            "models_from": "inventory" if self.config.models is not None else "engine",
        }

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def unavailable(self, why: str | None = None) -> RbeeError:
        cause = why or self.error or "not answering"
        return RbeeError(
            ErrorCode.CONNECTION_FAILED,
            f"upstream {self.name} ({self.config.url}) is down: {cause}",
            details={"upstream": self.name, "url": self.config.url},
        )


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    state: UpstreamState
    model: str  # the name the upstream knows
    public_id: str  # the name the client asked for


class Upstreams:
    """Every upstream of the inventory, probed in the background."""

    def __init__(
        self,
        configs: Iterable[Upstream],
        keys: Mapping[str, str | None],
        metrics: QueenMetrics,
        *,
        probe_timeout: float = PROBE_TIMEOUT,
        read_timeout: float = 300.0,
    ) -> None:
        self.states = {c.name: UpstreamState(c, keys.get(c.name)) for c in configs}
        self.metrics = metrics
        self._probe_timeout = probe_timeout
        # its own client: upstreams are other people's servers (public CAs, their keep-alive rules)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=probe_timeout, read=read_timeout, write=30.0, pool=30.0),
            trust_env=False,
        )
        self._checking: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[UpstreamState]:
        return iter(self.states.values())

    async def check(self, state: UpstreamState) -> None:
        """One probe: up with its model list, or down with the cause."""
        try:
            resp = await self.client.get(
                state.config.endpoint("models"), headers=state.headers(), timeout=self._probe_timeout
            )
            if resp.status_code >= 400:
                raise ValueError(f"GET /models answered {resp.status_code}")
            listed = _model_ids(resp.json())
        except (httpx.HTTPError, ValueError) as exc:
            self.mark_down(state, failure_cause(exc))
        else:
            if listed is None:
                self.mark_down(state, "GET /models did not answer an OpenAI model list")
            else:
                if len(listed) > MAX_MODELS:
                    log.warning(
                        "upstream %s lists %d models; keeping %d", state.name, len(listed), MAX_MODELS
                    )
                state.discovered = tuple(listed[:MAX_MODELS])
                if state.up is not True:
                    log.info("upstream %s is up (%d models)", state.name, len(state.models))
                state.up, state.error = True, None
                self.metrics.upstream_up.labels(state.name).set(1)
        state.checked_at = time.monotonic()

    def mark_down(self, state: UpstreamState, why: str) -> None:
        if state.up is not False:
            log.warning("upstream %s (%s) is down: %s", state.name, state.config.url, why)
        state.up, state.error = False, why
        self.metrics.upstream_up.labels(state.name).set(0)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(s) for s in self.states.values()))

    async def health_loop(self, interval: float) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(interval)

    async def _recheck(self) -> None:
        """A shared early probe for a name nobody offers (at most one per MIN_RECHECK seconds)."""
        stale = [s for s in self.states.values() if time.monotonic() - s.checked_at >= MIN_RECHECK]
        if not stale:
            return
        if self._checking is None or self._checking.done():
            self._checking = asyncio.create_task(self._check_some(stale))
        await asyncio.shield(self._checking)

    async def _check_some(self, states: list[UpstreamState]) -> None:
        await asyncio.gather(*(self.check(s) for s in states))

    def find(self, requested: str, local: set[str]) -> UpstreamTarget | None:
        """The upstream serving `requested` (`upstream/model`, or a model name rbee does not offer)."""
        name, sep, model = requested.partition("/")
        state = self.states.get(name) if sep else None
        if state is not None and model in state.models:
            return UpstreamTarget(state, model, requested)
        if requested in local:
            return None
        for state in self.states.values():
            if requested in state.models:
                return UpstreamTarget(state, requested, requested)
        return None

    async def resolve(self, requested: str, local: set[str]) -> UpstreamTarget | None:
        found = self.find(requested, local)
        if found is None and self.states and requested not in local:
            await self._recheck()
            found = self.find(requested, local)
        return found

    def public_models(self, local: set[str]) -> list[tuple[str, str]]:
        """(id, owned_by) for every upstream model: its plain name unless rbee offers that name too."""
        out: list[tuple[str, str]] = []
        seen = set(local)
        for state in self.states.values():
            for model in state.models:
                public = model if model not in seen else f"{state.name}/{model}"
                seen.add(public)
                out.append((public, state.name))
        return out

    async def aclose(self) -> None:
        if self._checking is not None:
            self._checking.cancel()
            with contextlib.suppress(BaseException):
                await self._checking
        await self.client.aclose()


def _model_ids(body: object) -> list[str] | None:
    """Model ids of an OpenAI `{"data": [{"id": …}]}` listing; ids that are not plain names are skipped."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None
    ids = [item.get("id") for item in body["data"] if isinstance(item, dict)]
    return [i for i in ids if isinstance(i, str) and MODEL_ID_RE.fullmatch(i)]


def failure_cause(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({exc or 'refused'})"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    return str(exc) or type(exc).__name__
