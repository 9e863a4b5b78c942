"""rbee-hive: the per-node daemon and CLI that owns a node's models and workers.

The keeper drives a node only through `rbee-hive <subcommand>` (over SSH or as a
local subprocess); the daemon itself listens on a Unix socket, never on TCP.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rbee")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

API_VERSION = "v1"
