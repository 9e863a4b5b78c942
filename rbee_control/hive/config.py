"""The daemon's policy knobs, from options or `RBEE_HIVE_*` environment variables.

Defaults follow the design (health every 30 s, idle and loading timeouts 300 s,
RAM needed = model size × 1.2, ports 8081–9000); tests shorten them through the
same options an operator would use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class HiveConfig:
    #: where workers listen (the node's address as the keeper and the queen see it)
    address: str = "127.0.0.1"
    #: the host put in worker URLs when that is not `address` (e.g. a name, with address 0.0.0.0)
    advertise: str = ""
    port_min: int = 8081
    port_max: int = 9000
    health_interval: float = 30.0
    #: how often busy/idle and the last token time are read from each worker's /metrics
    poll_interval: float = 5.0
    idle_timeout: float = 300.0
    loading_timeout: float = 300.0
    #: seconds a worker gets between the graceful shutdown request and SIGTERM
    stop_timeout: float = 10.0
    #: seconds from launch until the worker's HTTP port must answer
    startup_timeout: float = 30.0
    ram_factor: float = 1.2
    failed_probes_limit: int = 3
    #: seconds an RPC server may go without its split worker's connection before it is stopped
    rpc_grace: float = 10.0
    #: workers serve HTTPS with the hive's certificate: "auto" beyond loopback, "on" always
    tls: str = "auto"

    def __post_init__(self) -> None:
        if self.tls not in ("auto", "on"):
            from rbee_worker.protocol.errors import ErrorCode, RbeeError

            raise RbeeError(
                ErrorCode.INVALID_REQUEST, f"--tls must be auto or on, not {self.tls!r}", status=400
            )

    @classmethod
    def from_sources(cls, **options: Any) -> HiveConfig:
        """Options given (not None) win over `RBEE_HIVE_<NAME>` env vars, which win over defaults."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = options.get(f.name)
            if raw is None:
                raw = os.environ.get(f"RBEE_HIVE_{f.name.upper()}")
            if raw is not None:
                default: Any = f.default  # every field has one: a str, int or float
                values[f.name] = type(default)(raw)
        return cls(**values)

    def to_args(self) -> list[str]:
        """The same config as daemon options, to hand to a detached child."""
        args: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                args += [f"--{f.name.replace('_', '-')}", str(value)]
        return args
