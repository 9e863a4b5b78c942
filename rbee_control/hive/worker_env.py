"""The environment a worker starts with: an allow-list, not the hive's whole environment.

A hive started over SSH inherits whatever the login shell exports (`HF_TOKEN`,
cloud credentials, the queen's admin key); a worker runs untrusted model files
and needs none of it. It gets the locale, paths and device selection the runtime
reads, rbee's own settings (minus anything named like a secret), and its API key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

API_KEY_ENV = "RBEE_WORKER_API_KEY"

_NAMES = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
        "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
        "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
    }
)  # fmt: skip
#: locale, rbee's own, and what llama.cpp / BLAS / OpenMP / CUDA read for threads and devices
_PREFIXES = ("LC_", "RBEE_", "CUDA_", "GGML_", "LLAMA_", "OMP_", "MKL_", "OPENBLAS_")
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)


def worker_env(parent: Mapping[str, str], api_key: str) -> dict[str, str]:
    """The allowed part of `parent`, plus the worker's key."""
    env = {
        name: value
        for name, value in parent.items()
        if (name in _NAMES or name.startswith(_PREFIXES)) and not _SECRET.search(name)
    }
    env[API_KEY_ENV] = api_key
    return env
