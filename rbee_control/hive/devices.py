"""`rbee-hive detect`: the node's hardware picture, which everything that places work reads.

- cpu: always — cores and RAM (total, available) from psutil (/proc/meminfo on Linux);
- cuda: one device per GPU from `nvidia-smi --query-gpu=…` (MiB → bytes); a missing
  program means no CUDA, a failing one (driver gone, timeout) means no CUDA plus a warning;
- metal: Apple Silicon, asked of `sysctl` (kern.ostype Darwin and hw.optional.arm64 1),
  one device on the unified memory;
- which backends the installed llama-cpp-python carries (its backend libraries, and
  the build rbee recorded when it installed it).

The probes run programs found on PATH, so tests put captured output of real machines
there; nothing here imports llama_cpp (see `llama_probe` for that).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from rbee_worker.runtimes.llama_devices import built_backends

from .paths import HivePaths

MIB = 1 << 20
NVIDIA_SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=index,name,memory.total,memory.free",
    "--format=csv,noheader,nounits",
]
PROBE_TIMEOUT = 5.0
#: Metal lets one process wire about this share of unified memory (recommendedMaxWorkingSetSize).
METAL_WORKING_SET = 2 / 3
BUILD_FILE = "llama-build.json"


@dataclass(frozen=True, slots=True)
class Device:
    backend: str  # cpu | cuda | metal
    device: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class NodeDevices:
    devices: list[Device]
    cpu_cores: int
    #: backends the installed llama-cpp-python can drive ([] when it is not installed)
    llama_cpp_backends: list[str]
    #: what `setup install` recorded about the llama-cpp-python build, if it did
    llama_cpp_build: dict[str, Any] | None = None
    #: the CUDA compiler, needed to build llama-cpp-python for CUDA
    cuda_toolkit: str | None = None
    warnings: list[str] = field(default_factory=list)

    def find(self, backend: str, device: int | None = None) -> list[Device]:
        return [d for d in self.devices if d.backend == backend and (device is None or d.device == device)]

    @property
    def backends(self) -> list[str]:
        return list(dict.fromkeys(d.backend for d in self.devices))

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": [d.to_json() for d in self.devices],
            "backends": self.backends,
            "cpu_cores": self.cpu_cores,
            "llama_cpp_backends": self.llama_cpp_backends,
            "llama_cpp_build": self.llama_cpp_build,
            "cuda_toolkit": self.cuda_toolkit,
            "warnings": self.warnings,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeDevices:
        return cls(
            devices=[Device(**d) for d in data.get("devices", [])],
            cpu_cores=int(data.get("cpu_cores") or 0),
            llama_cpp_backends=list(data.get("llama_cpp_backends") or []),
            llama_cpp_build=data.get("llama_cpp_build"),
            cuda_toolkit=data.get("cuda_toolkit"),
            warnings=list(data.get("warnings") or []),
        )


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def detect_cpu() -> Device:
    mem = psutil.virtual_memory()
    return Device("cpu", 0, f"{os.cpu_count() or 1} cores", mem.total, mem.available)


def parse_nvidia_smi(text: str) -> tuple[list[Device], list[str]]:
    """Rows of `index, name, memory.total, memory.free` (MiB); unparsable rows become warnings."""
    devices, warnings = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            if len(parts) < 4:
                raise ValueError("expected 4 columns")
            index, total, free = int(parts[0]), int(parts[-2]), int(parts[-1])
            name = ", ".join(parts[1:-2])  # a name may itself hold a comma
        except ValueError:
            warnings.append(f"nvidia-smi: unreadable line {line.strip()[:120]!r}")
            continue
        devices.append(Device("cuda", index, name, total * MIB, free * MIB))
    return devices, warnings


def detect_cuda(timeout: float = PROBE_TIMEOUT) -> tuple[list[Device], list[str]]:
    """GPUs as nvidia-smi lists them; no nvidia-smi → none, silently; a failure → none, with why."""
    if shutil.which("nvidia-smi") is None:
        return [], []
    try:
        proc = _run(NVIDIA_SMI_QUERY, timeout)
    except subprocess.TimeoutExpired:
        return [], [f"nvidia-smi did not answer within {timeout:g} s; CUDA devices unknown"]
    except OSError as exc:
        return [], [f"nvidia-smi could not run: {exc}"]
    if proc.returncode != 0:
        why = (proc.stdout.strip() or proc.stderr.strip() or f"exit {proc.returncode}").splitlines()[0]
        return [], [f"nvidia-smi failed (exit {proc.returncode}): {why[:300]}"]
    return parse_nvidia_smi(proc.stdout)


def _sysctl(key: str, timeout: float) -> str | None:
    try:
        proc = _run(["sysctl", "-n", key], timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def detect_metal(timeout: float = PROBE_TIMEOUT) -> tuple[list[Device], list[str]]:
    """The Apple Silicon GPU on its unified memory; nothing on other machines."""
    if shutil.which("sysctl") is None or _sysctl("kern.ostype", timeout) != "Darwin":
        return [], []
    if _sysctl("hw.optional.arm64", timeout) != "1":
        return [], []  # an Intel Mac: Metal exists, but llama.cpp's Metal backend targets Apple Silicon
    memsize = _sysctl("hw.memsize", timeout)
    if memsize is None or not memsize.isdigit():
        return [], [f"sysctl hw.memsize gave {memsize!r}; Metal memory unknown"]
    total = int(memsize)
    name = _sysctl("machdep.cpu.brand_string", timeout) or "Apple Silicon"
    free = min(psutil.virtual_memory().available, int(total * METAL_WORKING_SET))
    return [Device("metal", 0, name, total, free)], []


def find_cuda_toolkit() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").is_file():
            return str(Path(candidate) / "bin" / "nvcc")
    return None


def read_build_record(paths: HivePaths) -> dict[str, Any] | None:
    try:
        data = json.loads((paths.home / BUILD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_build_record(paths: HivePaths, record: dict[str, Any]) -> Path:
    path = paths.home / BUILD_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return path


def detect(paths: HivePaths, timeout: float = PROBE_TIMEOUT) -> NodeDevices:
    """Everything at once: cpu always, then cuda and metal, then the llama-cpp-python build."""
    cuda, cuda_warnings = detect_cuda(timeout)
    metal, metal_warnings = detect_metal(timeout)
    node = NodeDevices(
        devices=[detect_cpu(), *cuda, *metal],
        cpu_cores=os.cpu_count() or 1,
        llama_cpp_backends=built_backends(),
        llama_cpp_build=read_build_record(paths),
        cuda_toolkit=find_cuda_toolkit(),
        warnings=[*cuda_warnings, *metal_warnings],
    )
    for d in node.devices:
        if d.backend != "cpu" and node.llama_cpp_backends and d.backend not in node.llama_cpp_backends:
            node.warnings.append(
                f"{d.backend}:{d.device} ({d.name}) is present but llama-cpp-python was not built for "
                f"{d.backend}: rbee-keeper setup install --node NAME --extras llama --backend {d.backend}"
            )
    return node
