"""Which accelerators the installed llama-cpp-python can drive, asked two ways.

- `built_backends()` looks at the backend libraries shipped in the package
  (`libggml-cuda.so`, `libggml-metal.dylib`, …) without importing it: cheap
  enough for the hive's status path.
- `ggml_devices()` imports llama_cpp and asks ggml's own backend registry for
  its devices and their free memory: the truth inside a worker, which loads
  the library anyway.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ggml backend registry names → rbee's backend names
_REGISTRY_NAMES = {"cpu": "cpu", "cuda": "cuda", "metal": "metal", "mtl": "metal"}
_LIB = re.compile(r"^(?:lib)?ggml-(?P<name>[a-z0-9]+)\.(?:so|dylib|dll)")
#: not devices of this node: ggml's core, and the RPC client split workers use (docs/worker.md)
_NOT_BACKENDS = {"base", "rpc"}


def lib_dir() -> Path | None:
    """Where llama-cpp-python keeps its shared libraries, or None when it is not installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "lib"


def built_backends(directory: Path | None = None) -> list[str]:
    """ggml backends present as libraries (e.g. `["cpu", "cuda"]`), without loading them.

    A build whose ggml is one library (no per-backend files) reports `["cpu"]`.
    """
    directory = directory if directory is not None else lib_dir()
    if directory is None or not directory.is_dir():
        return []
    names = set()
    for path in directory.iterdir():
        m = _LIB.match(path.name)
        if m and m["name"] not in _NOT_BACKENDS:
            names.add(_REGISTRY_NAMES.get(m["name"], m["name"]))
    if not names and any(p.name.startswith(("libllama", "llama")) for p in directory.iterdir()):
        names.add("cpu")
    return sorted(names, key=lambda n: (n != "cpu", n))


@dataclass(frozen=True, slots=True)
class GgmlDevice:
    backend: str
    #: index among this backend's devices (what `main_gpu` and CUDA_VISIBLE_DEVICES count)
    index: int
    name: str
    description: str
    memory_free_bytes: int
    memory_total_bytes: int


def _bind(lib: Any) -> Any:
    import ctypes

    p, size = ctypes.c_void_p, ctypes.c_size_t
    sigs = {
        "ggml_backend_reg_count": ([], size),
        "ggml_backend_reg_get": ([size], p),
        "ggml_backend_reg_name": ([p], ctypes.c_char_p),
        "ggml_backend_reg_dev_count": ([p], size),
        "ggml_backend_reg_dev_get": ([p, size], p),
        "ggml_backend_dev_name": ([p], ctypes.c_char_p),
        "ggml_backend_dev_description": ([p], ctypes.c_char_p),
        "ggml_backend_dev_memory": ([p, ctypes.POINTER(size), ctypes.POINTER(size)], None),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def ggml_devices() -> list[GgmlDevice]:
    """Every device ggml's registry knows in this process (imports llama_cpp; ~0.3 s)."""
    import ctypes

    from llama_cpp._ggml import libggml

    lib = _bind(libggml)
    found = []
    for r in range(lib.ggml_backend_reg_count()):
        reg = lib.ggml_backend_reg_get(r)
        reg_name = (lib.ggml_backend_reg_name(reg) or b"?").decode()
        backend = _REGISTRY_NAMES.get(reg_name.lower(), reg_name.lower())
        for i in range(lib.ggml_backend_reg_dev_count(reg)):
            dev = lib.ggml_backend_reg_dev_get(reg, i)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            found.append(
                GgmlDevice(
                    backend=backend,
                    index=i,
                    name=(lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                    description=(lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                    memory_free_bytes=int(free.value),
                    memory_total_bytes=int(total.value),
                )
            )
    return found


def supports_gpu_offload() -> bool:
    """Can this build offload layers to a GPU of this node?

    Not `llama_supports_gpu_offload()`: it also says yes for a CPU build with the RPC
    backend (layers on other nodes' servers), which every rbee build has.
    """
    return any(b != "cpu" for b in built_backends())
