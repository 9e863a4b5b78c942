"""queen-rbee: the OpenAI-compatible router over rbee workers (DESIGN §6).

Public API: `create_app(fleet, api_key=, settings=)`, `run_queen(QueenOptions)`,
the `Fleet` protocol with `StaticFleet` and `InventoryFleet`, and the
`ModelEntry` / `WorkerEntry` values fleets deal in.
"""

from .app import create_app
from .cli import QueenOptions, run_queen
from .fleet import Fleet, ModelEntry, StaticFleet, WorkerEntry
from .inventory_fleet import InventoryFleet
from .state import QueenSettings

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
