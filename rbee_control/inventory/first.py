"""The operator's first inventory: where `setup add-node` writes when there is none yet.

An explicit `--inventory` or `$RBEE_INVENTORY` names the file to edit (created if
missing); otherwise the per-user file under the config directory is used, and
made with a commented header and the `local` node when it does not exist. The
repository's example `inventory.yaml` is therefore never written unless named.
"""

from __future__ import annotations

import os
from pathlib import Path

from rbee_control.inventory.atomic import atomic_write
from rbee_control.inventory.loader import INVENTORY_ENV
from rbee_control.inventory.paths import default_inventory_path

HEADER = """\
# rbee inventory: the machines of your fleet (created by rbee-keeper setup add-node).
# `rbee-keeper setup add-node NAME --ssh-host HOST` adds one and pins its host key;
# edits by the CLI keep your comments and ordering. Reference: docs/keeper.md.
nodes:
  local:                    # this machine, no SSH needed
    transport: local
    address: 127.0.0.1      # workers listen here
"""


def inventory_to_edit(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`--inventory`, else `$RBEE_INVENTORY`, else the per-user file (which may not exist yet)."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(INVENTORY_ENV)
    return Path(env) if env else default_inventory_path()


def create_first_inventory(path: Path) -> bool:
    """Write the starter inventory at `path` unless a file is there; True if it was written."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, HEADER.encode(), mode=0o644)
    return True
