"""Prometheus metrics of one worker, in a registry of its own (one app, one registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STATES = ("loading", "ready", "failed", "draining")

__all__ = ["CONTENT_TYPE_LATEST", "WorkerMetrics"]


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rbee_worker_requests", "Inference requests by outcome", ["outcome"], registry=r
        )
        self.tokens = Counter("rbee_worker_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "rbee_worker_ttft_seconds",
            "Time from request admission to first token",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.decode = Histogram(
            "rbee_worker_decode_seconds_per_token",
            "Decode time per generated token",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.slots_busy = Gauge("rbee_worker_slots_busy", "Slots generating now", registry=r)
        self.slots_total = Gauge("rbee_worker_slots_total", "Slots configured", registry=r)
        self.queue_depth = Gauge("rbee_worker_queue_depth", "Requests waiting for a slot", registry=r)
        self.state = Gauge("rbee_worker_state", "1 for the current state", ["state"], registry=r)
        self.last_token = Gauge(
            "rbee_worker_last_token_timestamp_seconds", "Unix time of the last streamed token", registry=r
        )
        self.set_state("loading")

    def set_state(self, state: str) -> None:
        for name in STATES:
            self.state.labels(name).set(1 if name == state else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
