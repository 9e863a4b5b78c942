"""Prometheus metrics of the queen, in a registry of its own (one app, one registry).

Model and node names come partly from registrations, so each is one label series
until `MAX_SERIES` distinct (model, node) pairs are known; later pairs collapse into
`model="other", node="other"` and a flood of names cannot grow `/metrics` without
bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "QueenMetrics"]

MAX_SERIES = 256
OTHER = "other"


class LabelBudget:
    """Known (model, node) pairs, at most `limit`; anything else is `other`."""

    def __init__(self, limit: int = MAX_SERIES) -> None:
        self.limit = limit
        self.pairs: set[tuple[str, str]] = set()
        self.models: set[str] = set()

    def pair(self, model: str, node: str) -> tuple[str, str]:
        key = (model, node)
        if key in self.pairs:
            return key
        if len(self.pairs) < self.limit:
            self.pairs.add(key)
            return key
        return (OTHER, OTHER)

    def model(self, model: str) -> str:
        if model in self.models:
            return model
        if len(self.models) < self.limit:
            self.models.add(model)
            return model
        return OTHER


class Bounded:
    """A labelled metric whose model (and node) labels go through the budget."""

    def __init__(self, metric: Any, budget: LabelBudget, model_at: int, node_at: int | None) -> None:
        self.metric = metric
        self.budget = budget
        self.model_at = model_at
        self.node_at = node_at

    def labels(self, *values: str) -> Any:
        bounded = list(values)
        if self.node_at is None:
            bounded[self.model_at] = self.budget.model(str(values[self.model_at]))
        else:
            model, node = self.budget.pair(str(values[self.model_at]), str(values[self.node_at]))
            bounded[self.model_at], bounded[self.node_at] = model, node
        return self.metric.labels(*bounded)


def _bounded(metric: Any, budget: LabelBudget, names: Sequence[str]) -> Any:
    names = list(names)
    return Bounded(metric, budget, names.index("model"), names.index("node") if "node" in names else None)


class QueenMetrics:
    def __init__(self, max_series: int = MAX_SERIES) -> None:
        self.registry = CollectorRegistry()
        self.budget = LabelBudget(max_series)
        r = self.registry
        self.requests = Counter(
            "rbee_queen_requests",
            "Client requests by route, model, node and outcome (ok, error, disconnected, rejected)",
            ["route", "model", "node", "outcome"],
            registry=r,
        )
        self.tokens = Counter("rbee_queen_tokens", "Tokens relayed to clients", ["model", "node"], registry=r)
        self.ttft = Histogram(
            "rbee_queen_ttft_seconds",
            "Time from the client's request to its first token (queueing and cold starts included)",
            ["model", "node"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.errors = Counter(
            "rbee_queen_errors", "Errors returned to clients or met upstream, by code", ["code"], registry=r
        )
        self.retries = Counter(
            "rbee_queen_retries", "Requests moved to another worker before their first token",
            ["model"], registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "rbee_queen_queue_depth", "Requests waiting for a worker (busy or cold)", ["model"], registry=r
        )
        self.cold_starts = Counter(
            "rbee_queen_cold_starts", "Workers started on demand, by outcome", ["model", "node", "outcome"],
            registry=r,
        )  # fmt: skip
        self.cold_start_seconds = Histogram(
            "rbee_queen_cold_start_seconds",
            "Time to start a worker on demand",
            ["model"],
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.workers = Gauge(
            "rbee_queen_workers", "Workers in the routing table", ["model", "node"], registry=r
        )
        self.in_flight = Gauge(
            "rbee_queen_in_flight", "Requests running on workers", ["model", "node"], registry=r
        )
        self.upstream_up = Gauge(
            "rbee_queen_upstream_up", "1 if the external engine answered its last probe, else 0",
            ["upstream"], registry=r,
        )  # fmt: skip

        for name in ("requests", "tokens", "ttft", "retries", "queue_depth", "cold_starts",
                     "cold_start_seconds", "workers", "in_flight"):  # fmt: skip
            metric = getattr(self, name)
            setattr(self, name, _bounded(metric, self.budget, metric._labelnames))

    def render(self) -> bytes:
        return generate_latest(self.registry)
