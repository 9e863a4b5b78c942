"""rbee-hive: the per-node daemon and CLI that owns a node's models and workers.

The keeper drives a node only through `rbee-hive <subcommand>` (over SSH or as a
local subprocess); the daemon itself listens on a Unix socket, never on TCP.
"""

from __future__ import annotations

from rbee_control import __version__

__all__ = ["API_VERSION", "__version__"]

API_VERSION = "v1"

#: Hints from the hive name the node this way (it does not know its inventory name); the keeper fills it in.
NODE_PLACEHOLDER = "<node>"
