"""rbee-hive: the per-node daemon and CLI that owns a node's models and workers.

The keeper drives a node only through `rbee-hive <subcommand>` (over SSH or as a
local subprocess); the daemon itself listens on a Unix socket, never on TCP.
"""

from __future__ import annotations

from rbee_control import __version__
from rbee_worker.protocol.node_events import NODE_PLACEHOLDER

__all__ = ["API_VERSION", "NODE_PLACEHOLDER", "__version__"]

API_VERSION = "v1"
