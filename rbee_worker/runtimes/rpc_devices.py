"""Adding llama.cpp RPC servers as devices of this process, the way `llama-server --rpc` does.

llama-cpp-python 0.3.36 accepts `Llama(rpc_servers=...)` and ignores it (the weights
stay on the CPU while the log claims offload). What works is calling ggml itself:
`ggml_backend_rpc_add_server(endpoint)` from libggml-rpc, then `ggml_backend_register`
from libggml, before the model is loaded with its layers offloaded.

The libraries must be the `.so.0` files (the sonames libllama was linked against):
the wheel also ships `.so` and `.so.0.x.y` as separate copies, and loading one of
those makes a second device registry that libllama never sees.

An unreachable server makes llama.cpp abort the process, so the caller checks each
endpoint first (`rbee_worker.protocol.rpc.hello`).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

from ..protocol.errors import ErrorCode, RbeeError
from ..protocol.rpc import RpcVersion, parse_endpoint

_registered: set[str] = set()


def _lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def _soname(stem: str) -> str:
    return f"{stem}.0.dylib" if sys.platform == "darwin" else f"{stem}.so.0"


def _not_built(why: str) -> RbeeError:
    return RbeeError(
        ErrorCode.BACKEND_NOT_AVAILABLE,
        f"this llama-cpp-python has no RPC backend ({why})",
        status=422,
        hint="rbee-keeper setup install --extras llama (builds it with -DGGML_RPC=ON)",
    )


def client_version() -> RpcVersion | None:
    """The RPC protocol this node's llama-cpp-python speaks, from the header installed with it."""
    try:
        package = _lib_dir().parent
    except ImportError:
        return None
    # the wheel puts its headers in site-packages/include; a source install may keep them in the package
    for header in (package.parent / "include" / "ggml-rpc.h", package / "include" / "ggml-rpc.h"):
        try:
            return RpcVersion.from_header(header.read_text())
        except OSError:
            continue
    return None


def has_rpc() -> bool:
    try:
        return (_lib_dir() / _soname("libggml-rpc")).is_file()
    except ImportError:
        return False


def register(endpoints: list[str]) -> None:
    """Make each server a device every later model load can place layers on (once per endpoint)."""
    lib_dir = _lib_dir()
    rpc_path, ggml_path = lib_dir / _soname("libggml-rpc"), lib_dir / _soname("libggml")
    if not rpc_path.is_file():
        raise _not_built(f"no {rpc_path.name} in {lib_dir}")
    rpc = ctypes.CDLL(str(rpc_path))
    ggml = ctypes.CDLL(str(ggml_path))
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_register.restype = None
    for endpoint in endpoints:
        parse_endpoint(endpoint)
        if endpoint in _registered:
            continue
        reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
        if not reg:
            raise RbeeError(
                ErrorCode.RPC_SERVER_UNREACHABLE,
                f"llama.cpp could not add RPC server {endpoint}",
                status=502,
                details={"endpoint": endpoint},
            )
        ggml.ggml_backend_register(reg)
        _registered.add(endpoint)
