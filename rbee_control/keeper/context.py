"""What every keeper command gets: where the inventory is, the inventory itself, output mode, SSH.

`cli.py` builds one per run and hands it to the command; commands never reach
back into the CLI module for these. The inventory is read on first use (and
`setup add-node` may run before the file exists); SSH is set up only by commands
that ask for a pool, so a warm `infer` never imports asyncssh.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rbee_control.inventory.loader import find_inventory, load_inventory
from rbee_control.inventory.model import Inventory

from .display import Display

if TYPE_CHECKING:
    from rbee_control.ssh.pool import TransportPool


@dataclass
class KeeperContext:
    display: Display
    #: `--inventory` as given (None: $RBEE_INVENTORY, ./inventory.yaml, …)
    inventory_arg: str | None = None
    _inventory: Inventory | None = field(default=None, init=False, repr=False)

    @property
    def json_mode(self) -> bool:
        return self.display.json_mode

    @property
    def inventory_path(self) -> Path:
        return find_inventory(self.inventory_arg)

    @property
    def inventory(self) -> Inventory:
        if self._inventory is None:
            self._inventory = load_inventory(self.inventory_path)
        return self._inventory

    def pool(self) -> TransportPool:
        """A fresh pool over the inventory's nodes; use it as `async with ctx.pool() as pool`."""
        from rbee_control.ssh.held_client import ConnectionHolder
        from rbee_control.ssh.pool import TransportPool

        return TransportPool(self.inventory, holder=ConnectionHolder.from_env())
