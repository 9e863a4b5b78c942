"""The inventory's `models:` block: where the queen starts a model and how many copies it keeps.

```yaml
models:
  qwen-7b:
    node: big            # the cold start goes here (default: the least busy node that has it)
    split: [mac, spare]  # its layers also go on RPC servers of these nodes (llama.cpp RPC)
  tiny:
    replicas: {min: 1, max: 3}   # keep one warm, add up to two more under load
    source: hf:owner/repo:tiny.Q4_K_M.gguf   # where a node without it fetches it (a replica's)
    sha256: 0f3a…                             # required for http://, checked for any source
```
Defaults are today's behaviour: no split, `replicas: {min: 0, max: 1}`, replicas only on
nodes that already hold the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MIN_REPLICAS = 0
DEFAULT_MAX_REPLICAS = 1
#: a catalog name, as the hive accepts it
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MODEL_KEYS = ("node", "split", "replicas", "source", "sha256")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
REPLICA_KEYS = ("min", "max")


@dataclass(frozen=True, slots=True)
class ModelPlacement:
    name: str
    node: str | None = None
    split: tuple[str, ...] = ()
    min_replicas: int = DEFAULT_MIN_REPLICAS
    max_replicas: int = DEFAULT_MAX_REPLICAS
    #: a model ref (`hf:` or `http(s)://`) a node without the model downloads it from
    source: str | None = None
    sha256: str | None = None

    @classmethod
    def default(cls, name: str) -> ModelPlacement:
        return cls(name)


def source_problem(source: str, sha256: str | None) -> str | None:
    """Why `source` cannot be fetched by any node (None: it can); the hive parses it in full."""
    if not source.startswith(("hf:", "https://", "http://")):
        return "expected hf:owner/repo:file.gguf or an http(s):// URL (a file: path is one node's own)"
    if source.startswith("http://") and sha256 is None:
        return "an http:// source needs sha256: (nothing from the network is trusted without a hash)"
    return None
