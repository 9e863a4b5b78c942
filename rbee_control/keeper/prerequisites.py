"""What a node must have before `setup install` touches it, and the command that fixes each gap.

One shell probe over SSH reports the facts (OS, arch, the inventory's `python`,
its venv module, free disk under the home, a C compiler); `missing` turns them
into one line per gap with the fixing command, so an operator fixes everything
in one pass instead of meeting the failures one pip error at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from rbee_control.inventory.model import Node
from rbee_worker.protocol.errors import ErrorCode, RbeeError

MIN_PYTHON = (3, 11)
#: a venv with rbee's dependencies takes ~150 MB; leave room for pip's temporary files
MIN_FREE_BYTES = 1 << 30
SUPPORTED_OS = ("Linux", "Darwin")
SUPPORTED_ARCH = ("x86_64", "amd64", "aarch64", "arm64")

#: $1 python, $2 the (absolute) home. Prints key=value lines; never fails as a whole.
PROBE = r"""
py="$1"; home="$2"
echo "os=$(uname -s)"
echo "arch=$(uname -m)"
echo "home_dir=$HOME"
echo "xdg_config=${XDG_CONFIG_HOME:-}"
echo "user=$(id -un)"
if command -v "$py" >/dev/null 2>&1; then
  echo "python=$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)"
  "$py" -c 'import venv, ensurepip' >/dev/null 2>&1 && echo "venv=yes" || echo "venv=no"
else
  echo "python="
fi
d="$home"; while [ ! -d "$d" ]; do d=$(dirname "$d"); done
echo "free_kb=$(df -Pk "$d" | awk 'NR==2 {print $4}')"
for c in cc gcc clang; do
  if command -v "$c" >/dev/null 2>&1; then echo "compiler=$(command -v "$c")"; break; fi
done
"""


@dataclass(frozen=True, slots=True)
class NodeFacts:
    os: str
    arch: str
    home_dir: str
    xdg_config: str
    user: str
    python: tuple[int, ...] | None
    venv: bool
    free_bytes: int | None
    compiler: str | None

    @classmethod
    def parse(cls, text: str) -> NodeFacts:
        kv: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key not in kv:
                kv[key] = value.strip()
        version = kv.get("python", "")
        parts = tuple(int(p) for p in version.split(".") if p.isdigit()) if version else ()
        free = kv.get("free_kb", "")
        return cls(
            os=kv.get("os", ""),
            arch=kv.get("arch", ""),
            home_dir=kv.get("home_dir", ""),
            xdg_config=kv.get("xdg_config", ""),
            user=kv.get("user", ""),
            python=parts or None,
            venv=kv.get("venv") == "yes",
            free_bytes=int(free) * 1024 if free.isdigit() else None,
            compiler=kv.get("compiler") or None,
        )

    @property
    def macos(self) -> bool:
        return self.os == "Darwin"


def missing(node: Node, facts: NodeFacts, home: str, needs_compiler: bool) -> list[str]:
    """One line per missing prerequisite: what is wrong, then `fix:` and the command."""
    py = node.python
    lines = []
    if facts.os not in SUPPORTED_OS:
        lines.append(f"OS {facts.os or 'unknown'} is not supported — fix: use a Linux or macOS machine")
    if facts.arch not in SUPPORTED_ARCH:
        lines.append(f"CPU {facts.arch or 'unknown'} is not supported — fix: use an x86-64 or arm64 machine")
    newer = "python3.12"
    install_py = (
        "brew install python@3.12" if facts.macos else "sudo apt-get install python3.12 python3.12-venv"
    )
    use_it = f"then set `python: {newer}` for node {node.name} in the inventory"
    if facts.python is None:
        lines.append(f"no Python at `{py}` — fix: {install_py}, {use_it}")
    elif facts.python[:2] < MIN_PYTHON:
        have = ".".join(map(str, facts.python))
        lines.append(f"Python {have} at `{py}` is older than 3.11 — fix: {install_py}, {use_it}")
    elif not facts.venv:
        major_minor = ".".join(map(str, facts.python[:2]))
        fix = f"sudo apt-get install python{major_minor}-venv" if not facts.macos else "brew reinstall python"
        lines.append(f"Python at `{py}` has no venv module (ensurepip) — fix: {fix}")
    if facts.free_bytes is not None and facts.free_bytes < MIN_FREE_BYTES:
        lines.append(
            f"only {facts.free_bytes / 2**20:.0f} MB free under {home} (1 GB needed) — "
            f"fix: free space there (du -sh {home}/* ; df -h {home})"
        )
    if needs_compiler and facts.compiler is None:
        fix = "xcode-select --install" if facts.macos else "sudo apt-get install build-essential cmake"
        lines.append(f"no C compiler to build llama-cpp-python — fix: {fix}")
    return lines


def refuse(node: Node, lines: list[str]) -> RbeeError:
    body = "\n".join(f"  ✗ {line}" for line in lines)
    return RbeeError(
        ErrorCode.PREREQUISITES_MISSING,
        f"node {node.name} is missing what rbee needs:\n{body}",
        status=422,
        details={"node": node.name, "missing": lines},
        hint=f"rbee-keeper setup install --node {node.name}",
    )
