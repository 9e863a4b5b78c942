"""The inventory's `models:` block: where the queen starts a model and how many copies it keeps.

```yaml
models:
  qwen-7b:
    node: big            # the cold start goes here (default: the least busy node that has it)
    split: [mac, spare]  # its layers also go on RPC servers of these nodes (llama.cpp RPC)
  tiny:
    replicas: {min: 1, max: 3}   # keep one warm, add up to two more under load
```
Defaults are today's behaviour: no split, `replicas: {min: 0, max: 1}`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MIN_REPLICAS = 0
DEFAULT_MAX_REPLICAS = 1
#: a catalog name, as the hive accepts it
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MODEL_KEYS = ("node", "split", "replicas")
REPLICA_KEYS = ("min", "max")


@dataclass(frozen=True, slots=True)
class ModelPlacement:
    name: str
    node: str | None = None
    split: tuple[str, ...] = ()
    min_replicas: int = DEFAULT_MIN_REPLICAS
    max_replicas: int = DEFAULT_MAX_REPLICAS

    @classmethod
    def default(cls, name: str) -> ModelPlacement:
        return cls(name)
