"""Building `ggml-rpc-server` from the very llama.cpp sources llama-cpp-python was built from.

The RPC protocol version is compiled into both sides (the server's major must
equal the client's, its minor must not be higher), so the server is built from the
`vendor/llama.cpp` of the same llama-cpp-python sdist, statically linked (one file
to install), and cached per version; installing it copies it beside this Python
(`<venv>/bin`), where the hive looks first.

`python -m rbee_control.hive.rpc_build` does it all (scripts/setup.sh and
`rbee-hive install-llama` call it); it is quick when cached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from rbee_worker.protocol.errors import ErrorCode, RbeeError

from .rpc_servers import BINARY

LLAMA_VERSION = os.environ.get("RBEE_LLAMA_VERSION", "0.3.36")
#: a ready binary of this version for this platform, used instead of a build (offline installs)
PREBUILT_ENV = "RBEE_RPC_SERVER_PREBUILT"
BUILD_TIMEOUT = 3600
CMAKE_ARGS = [
    "-DGGML_RPC=ON",
    "-DGGML_NATIVE=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
]


def cache_root() -> Path:
    return Path(os.environ.get("RBEE_CACHE") or Path.home() / ".cache" / "rbee")


def cached_binary(version: str = LLAMA_VERSION) -> Path:
    return cache_root() / f"ggml-rpc-server-{version}" / BINARY


def _run(argv: list[str], log: Path, cwd: Path | None = None) -> None:
    with log.open("ab") as out:
        code = subprocess.run(
            argv,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=BUILD_TIMEOUT,
        ).returncode
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise RbeeError(
            ErrorCode.INTERNAL_ERROR,
            f"building {BINARY} failed ({argv[0]} exit {code}): " + " | ".join(tail),
            details={"log": str(log)},
            hint="it needs cmake and a C++ compiler: apt-get install cmake build-essential",
        )


def sdist_sources(version: str, log: Path) -> Path:
    """The unpacked llama-cpp-python sdist (downloaded once with pip into the cache)."""
    root = cache_root() / "sdist"
    unpacked = root / f"llama_cpp_python-{version}"
    if (unpacked / "vendor" / "llama.cpp" / "tools" / "rpc").is_dir():
        return unpacked
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"llama_cpp_python-{version}.tar.gz"
    if not archive.is_file():
        _run(
            [
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "--disable-pip-version-check", "-d", str(root), f"llama-cpp-python=={version}",
            ],
            log,
        )  # fmt: skip
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return unpacked


def build(version: str = LLAMA_VERSION, jobs: int = 2) -> Path:
    """The cached binary, built first if missing (minutes on two cores, once per version)."""
    target = cached_binary(version)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    pushed = os.environ.get(PREBUILT_ENV)
    if pushed and Path(pushed).is_file():  # an offline install: the keeper pushed its own build
        shutil.copy2(pushed, target.with_suffix(".tmp"))
        header = Path(pushed).with_name("ggml-rpc.h")
        if header.is_file():
            shutil.copy2(header, target.parent / "ggml-rpc.h")
        target.with_suffix(".tmp").replace(target)
        return target
    log = target.parent / "build.log"
    source = sdist_sources(version, log) / "vendor" / "llama.cpp"
    with tempfile.TemporaryDirectory(prefix="rbee-rpc-build-") as tmp:
        build_dir = Path(tmp)
        _run(["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_ARGS], log)
        _run(["cmake", "--build", str(build_dir), "--target", BINARY, f"-j{jobs}"], log)
        built = build_dir / "bin" / BINARY
        shutil.copy2(built, target.with_suffix(".tmp"))
        shutil.copy2(source / "ggml" / "include" / "ggml-rpc.h", target.parent / "ggml-rpc.h")
    target.with_suffix(".tmp").replace(target)
    return target


def install(version: str = LLAMA_VERSION, prefix: str = sys.prefix) -> Path:
    """Build (or reuse) and copy into `<prefix>/bin`, where the hive finds it."""
    source = build(version)
    dest = Path(prefix) / "bin" / BINARY
    if not dest.is_file() or dest.stat().st_size != source.stat().st_size:
        shutil.copy2(source, dest.with_suffix(".tmp"))
        dest.with_suffix(".tmp").replace(dest)
    return dest


if __name__ == "__main__":
    try:
        print(install())
    except RbeeError as exc:
        print(f"rpc_build: {exc.message}", file=sys.stderr)
        sys.exit(1)
