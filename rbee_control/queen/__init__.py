"""queen-rbee: the OpenAI-compatible router over rbee workers (DESIGN §6).

Public API: `create_app(fleet, api_key=, admin_key=, settings=)`, `run_queen(QueenOptions)`,
the `Fleet` protocol with `StaticFleet` and `InventoryFleet`, and the
`ModelEntry` / `WorkerEntry` values fleets deal in.

Names are imported on first use, so `rbee-keeper` can build its `serve` options
(`rbee_control.queen.options`) without loading the server and its dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .cli import QueenOptions, run_queen
    from .fleet import Fleet, ModelEntry, StaticFleet, WorkerEntry
    from .inventory_fleet import InventoryFleet
    from .state import QueenSettings

_HOMES = {
    "Fleet": ".fleet",
    "InventoryFleet": ".inventory_fleet",
    "ModelEntry": ".fleet",
    "QueenOptions": ".cli",
    "QueenSettings": ".state",
    "StaticFleet": ".fleet",
    "WorkerEntry": ".fleet",
    "create_app": ".app",
    "run_queen": ".cli",
}

__all__ = [
    "Fleet",
    "InventoryFleet",
    "ModelEntry",
    "QueenOptions",
    "QueenSettings",
    "StaticFleet",
    "WorkerEntry",
    "create_app",
    "run_queen",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
