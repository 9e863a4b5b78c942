"""Where the keeper keeps its own state: rbee's known_hosts and the default inventory.

Everything lives under one config directory (`$RBEE_CONFIG_DIR`, else
`$XDG_CONFIG_HOME/rbee`, else `~/.config/rbee`) so a test or a second operator
profile can point the whole keeper elsewhere with one variable.
"""

from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> Path:
    """The keeper's config directory (not created here)."""
    explicit = os.environ.get("RBEE_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "rbee"


def known_hosts_path() -> Path:
    """rbee's own known_hosts: pinned node host keys, separate from `~/.ssh/known_hosts`."""
    return config_dir() / "known_hosts"


def default_inventory_path() -> Path:
    """The per-user inventory, the last place `find_inventory` looks."""
    return config_dir() / "inventory.yaml"
