"""The control plane's one way to drive a node: `rbee-hive --json …` over the node's transport.

Shared by the keeper (one command, one transport) and the queen (a pool that
reconnects on demand), so neither reaches into the other.
"""

from .client import NodeClient, ProgressCallback

__all__ = ["NodeClient", "ProgressCallback"]
