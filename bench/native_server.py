"""llama.cpp's own `llama-server`, built once from the installed llama-cpp-python's vendored sources.

The benchmarks compare rbee with it on equal terms: the same llama.cpp commit, `GGML_NATIVE=OFF`
as the wheel, and `GGML_RPC=ON` so one binary serves both `-np N` (bench/batching.py) and
`--rpc` (bench/split.py). Cached as `~/.cache/rbee/llama-server-rpc-<version>/llama-server`.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path(os.environ.get("RBEE_CACHE", Path.home() / ".cache" / "rbee"))
BUILD_TIMEOUT_S = 3600.0


def llama_cpp_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def llama_server_binary(version: str) -> Path:
    """The cached binary, built first when missing (several minutes on two cores, once per version)."""
    binary = CACHE / f"llama-server-rpc-{version}" / "llama-server"
    if binary.is_file():
        return binary
    sdist_dir = CACHE / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    archive = sdist_dir / f"llama_cpp_python-{version}.tar.gz"
    if not archive.is_file():
        print(f"downloading the llama-cpp-python {version} sdist", file=sys.stderr, flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", str(sdist_dir)],
            check=True,
        )  # fmt: skip
    source = sdist_dir / f"llama_cpp_python-{version}"
    if not source.is_dir():
        with tarfile.open(archive) as tar:
            tar.extractall(sdist_dir, filter="data")
    llama = source / "vendor" / "llama.cpp"
    build = llama / "build-server-rpc"
    print(f"building llama-server (with RPC) from {llama} (several minutes)", file=sys.stderr, flush=True)
    subprocess.run(
        ["cmake", "-S", str(llama), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF",
         "-DGGML_RPC=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
         "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF"],
        check=True, stdout=subprocess.DEVNULL, timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    subprocess.run(
        ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
        check=True, stdout=subprocess.DEVNULL, timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build / "bin" / "llama-server", binary)
    return binary


if __name__ == "__main__":
    print(llama_server_binary(llama_cpp_version()))
