"""Prometheus metrics of the queen, in a registry of its own (one app, one registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "QueenMetrics"]


class QueenMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
