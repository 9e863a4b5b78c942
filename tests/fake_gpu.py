"""Stand-ins for `nvidia-smi` and `sysctl` that print what real machines print.

These machines have no GPU, so device detection is tested against programs put
first on PATH that answer exactly as the real ones did (output captured from an
RTX 3090 box, a two-GPU workstation, a Linux box whose driver is gone, and Apple
Silicon and Intel Macs). The detection code runs them as it would the real
ones: by name, with the same arguments, through PATH.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

#: `nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader,nounits`
NVIDIA_ONE_GPU = "0, NVIDIA GeForce RTX 3090, 24576, 23892\n"
NVIDIA_TWO_GPUS = "0, NVIDIA GeForce RTX 4090, 24564, 23981\n1, NVIDIA GeForce RTX 3060, 12288, 11796\n"
#: exit status 9, on stdout: the kernel module is not loaded (after a kernel update, say)
NVIDIA_DRIVER_ERROR = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n\n"
)

#: `sysctl -n KEY` on a MacBook Pro (M2 Pro, 32 GB) and on an Intel iMac (no hw.optional.arm64)
APPLE_SILICON = {
    "kern.ostype": "Darwin",
    "hw.optional.arm64": "1",
    "hw.memsize": "34359738368",
    "machdep.cpu.brand_string": "Apple M2 Pro",
}
INTEL_MAC = {
    "kern.ostype": "Darwin",
    "hw.memsize": "17179869184",
    "machdep.cpu.brand_string": "Intel(R) Core(TM) i7-8700B CPU @ 3.20GHz",
}


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def nvidia_smi(bin_dir: Path, stdout: str, exit_code: int = 0) -> Path:
    """An `nvidia-smi` that insists on rbee's query and prints `stdout`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    query = "--query-gpu=index,name,memory.total,memory.free --format=csv,noheader,nounits"
    return _script(
        bin_dir / "nvidia-smi",
        f'if [ "$*" != {shlex.quote(query)} ]; then echo "unexpected arguments: $*" >&2; exit 2; fi\n'
        f"printf %s {shlex.quote(stdout)}\nexit {exit_code}\n",
    )


def sysctl(bin_dir: Path, values: dict[str, str]) -> Path:
    """A macOS `sysctl -n KEY`: the value, or macOS's "unknown oid" error for other keys."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    cases = "".join(f"  {shlex.quote(k)}) echo {shlex.quote(v)} ;;\n" for k, v in values.items())
    return _script(
        bin_dir / "sysctl",
        '[ "$1" = "-n" ] || exit 2\n'
        f'case "$2" in\n{cases}'
        "  *) echo \"sysctl: unknown oid '$2'\" >&2; exit 1 ;;\nesac\n",
    )


def with_path(env: dict[str, str], bin_dir: Path) -> dict[str, str]:
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', os.defpath)}"}


def hung_nvidia_smi(bin_dir: Path) -> Path:
    """An `nvidia-smi` that never answers, as one does when the driver is wedged."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    return _script(bin_dir / "nvidia-smi", "exec sleep 60\n")
