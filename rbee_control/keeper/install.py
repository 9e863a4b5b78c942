"""`setup install` on one node: check it, build a fresh venv, fill it, then switch to it.

Each install goes into `<home>/venvs/rbee-<version>-<digest>` and `<home>/venv`
becomes a symlink to it only once `rbee-hive --version` answers from there, so a
failed install leaves the previous one in place and working. The digest is of the
wheel's RECORD (the hash of every file in it), so installing the same build again
is a no-op. The venv before the current one is kept (a running hive may still use
it); older ones under `venvs/` are removed.

The node's pip fetches the dependencies unless it cannot reach a package index
(or `--offline`): then the keeper downloads wheels for the node's interpreter and
platform tags (`pip download --platform … --only-binary=:all:`), pushes them over
SFTP and the node installs with `--no-index`.
"""

from __future__ import annotations

import asyncio
import hashlib
import shlex
import sys
import sysconfig
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from rbee_control import __version__
from rbee_control.inventory.model import Node
from rbee_control.node.client import NodeClient
from rbee_control.ssh.node_command import node_env
from rbee_worker.protocol.errors import ErrorCode, RbeeError

from .context import KeeperContext
from .display import Display, NodeProgress
from .prerequisites import PROBE, NodeFacts, missing, refuse
from .service import install_service

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: a dependency every install needs: the node can reach an index if its pip can fetch this
INDEX_PROBE = "anyio"

#: run by the new venv's python: the platform tags its pip accepts, most specific first
_TAGS = (
    "from pip._vendor.packaging.tags import sys_tags\n"
    "seen = []\n"
    "for t in sys_tags():\n"
    "    if t.platform not in seen: seen.append(t.platform)\n"
    "import sys; print(sys.implementation.name, '%d%d' % sys.version_info[:2], *seen)\n"
)

#: $1 the new venv, $2 the `venv` link: switch atomically (rename over a symlink), keep the
#: previous venv, drop older ones under venvs/ (never anything outside it).
_SWITCH = r"""
import os, shutil, sys, time
new, link = sys.argv[1], sys.argv[2]
venvs = os.path.dirname(new)
previous = os.path.realpath(link) if os.path.lexists(link) else None
if os.path.isdir(link) and not os.path.islink(link):
    previous = os.path.join(venvs, "previous-%d" % time.time())
    os.rename(link, previous)
tmp = link + ".new"
if os.path.lexists(tmp):
    os.unlink(tmp)
os.symlink(new, tmp)
os.replace(tmp, link)
keep = {os.path.realpath(new), previous and os.path.realpath(previous)}
for name in os.listdir(venvs):
    path = os.path.join(venvs, name)
    if os.path.realpath(path) not in keep:
        shutil.rmtree(path, ignore_errors=True)
"""


@dataclass(frozen=True, slots=True)
class InstallOptions:
    extras: str | None = None
    backend: str = "auto"
    offline: bool = False


async def build_wheel(directory: Path, root: Path = PROJECT_ROOT) -> Path:
    """Build this package's wheel once per run; nodes install exactly what the keeper runs."""
    if not (root / "pyproject.toml").exists():
        raise RbeeError(ErrorCode.INTERNAL_ERROR, f"no rbee source tree at {root} to build a wheel from")
    _, err, code = await _local(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(directory), str(root)
    )
    wheels = sorted(directory.glob("rbee-*.whl"))
    if code or not wheels:
        raise RbeeError(ErrorCode.INTERNAL_ERROR, f"building the rbee wheel failed: {err[-500:]}")
    return wheels[-1]


def wheel_digest(wheel: Path) -> str:
    """sha256 of the wheel's RECORD: the same files give the same digest, whatever the zip's timestamps."""
    with zipfile.ZipFile(wheel) as zf:
        record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        return hashlib.sha256(zf.read(record)).hexdigest()


def split_extras(extras: str | None) -> tuple[str | None, bool]:
    """(extras for pip, whether llama-cpp-python is wanted): the node builds that one itself."""
    names = [e.strip() for e in (extras or "").split(",") if e.strip()]
    rest = [e for e in names if e != "llama"]
    return (",".join(rest) or None), len(rest) != len(names)


class NodeInstall:
    """One node's install, step by step, each narrated as `<node>: <step>`."""

    def __init__(self, node: Node, transport: Any, progress: NodeProgress, display: Display | None) -> None:
        self.node, self.transport, self.progress, self.display = node, transport, progress, display

    def step(self, message: str) -> None:
        self.progress.note(f"[dim]{self.node.name}: {message}[/dim]")

    async def sh(self, script: str, *args: str, timeout: float = 60) -> Any:
        return await self.transport.run(["sh", "-c", script, "sh", *args], timeout=timeout)

    async def home(self) -> str:
        home = self.node.home
        if home.startswith("~"):
            found = await self.transport.run(["printenv", "HOME"], timeout=30)
            base = found.stdout.strip() if found.ok else ""
            if not base.startswith("/"):
                raise RbeeError(
                    ErrorCode.INTERNAL_ERROR, f"cannot find the home directory on {self.node.name}"
                )
            home = base + home[1:]
        return home

    async def facts(self, home: str) -> NodeFacts:
        probe = await self.sh(PROBE, self.node.python, home, timeout=60)
        return NodeFacts.parse(probe.stdout)

    async def check(self, home: str, llama: bool) -> NodeFacts:
        self.step("checking prerequisites (OS, arch, Python ≥ 3.11 with venv, disk, compiler)")
        facts = await self.facts(home)
        gaps = missing(self.node, facts, home, needs_compiler=llama and not _cached_llama_wheels())
        if gaps:
            raise refuse(self.node, gaps)
        return facts

    async def install(self, wheel: Path, options: InstallOptions) -> dict[str, Any]:
        """Install `wheel` unless this very build is there; `offline` and `wheels` say how it went."""
        extras, llama = split_extras(options.extras)
        home = await self.home()
        await self.check(home, llama)
        digest = wheel_digest(wheel)
        stamp = time.strftime("%Y%m%d%H%M%S")
        link, venv = f"{home}/venv", f"{home}/venvs/rbee-{__version__}-{digest[:12]}-{stamp}"
        result: dict[str, Any] = {"node": self.node.name, "wheel": wheel.name, "home": home}
        if await self._current(link, digest):
            self.step(f"{wheel.name} is already installed")
            result["version"] = await self._version(link)
            result["unchanged"] = True
        elif await self._same_release(link):
            result.update(await self._in_place(home, link, wheel, digest, extras))
        else:
            fresh = await self._fresh_venv(home, link, venv, wheel, digest, extras, options.offline, llama)
            result.update(fresh)
        return result

    async def _current(self, link: str, digest: str) -> bool:
        marker = await self.transport.run(["cat", f"{link}/rbee-wheel.sha256"], timeout=30)
        return marker.ok and marker.stdout.strip() == digest and bool(await self._version(link, check=False))

    async def _same_release(self, link: str) -> bool:
        """The venv there holds this release (another build of it): its dependencies are right."""
        probe = "import rbee_worker; print(rbee_worker.__version__)"
        found = await self.transport.run([f"{link}/bin/python", "-c", probe], timeout=60)
        return bool(found.ok) and found.stdout.strip() == __version__

    async def _in_place(
        self, home: str, link: str, wheel: Path, digest: str, extras: str | None
    ) -> dict[str, Any]:
        """Another build of the same release: replace rbee alone in the current venv (seconds, not
        minutes); its dependencies are the same, so only rbee's own files change."""
        target = f"{home}/incoming/{wheel.name}"
        await self.transport.run(["mkdir", "-p", f"{home}/incoming"], timeout=30)
        await self.transport.put(wheel, target, self._bar(wheel.name), resume=False)
        spec = f"{target}[{extras}]" if extras else target
        self.step(f"replacing rbee in {link} (same release {__version__})")
        pip = [f"{link}/bin/python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        done = await self.transport.run([*pip, "--force-reinstall", "--no-deps", spec], timeout=900)
        if not done.ok:
            raise RbeeError(
                ErrorCode.INTERNAL_ERROR, f"pip install on {self.node.name} failed: {done.stderr[-600:]}"
            )
        version = await self._version(link)
        await self.transport.run(["sh", "-c", f"echo {digest} > {shlex.quote(link)}/rbee-wheel.sha256"])
        return {"version": version, "offline": False}

    async def _version(self, venv: str, check: bool = True) -> str:
        found = await self.transport.run(
            [f"{venv}/bin/rbee-hive", "--version"], env=node_env(self.node), timeout=60
        )
        if check and not (found.ok and found.stdout.split()[-1:] == [__version__]):
            raise RbeeError(
                ErrorCode.INTERNAL_ERROR,
                f"the new install on {self.node.name} does not run: {(found.stderr or found.stdout)[-400:]}",
            )
        return found.stdout.strip() if found.ok else ""

    async def _fresh_venv(
        self,
        home: str,
        link: str,
        venv: str,
        wheel: Path,
        digest: str,
        extras: str | None,
        offline: bool,
        llama: bool,
    ) -> dict[str, Any]:
        self.step(f"creating a new venv {venv}")
        await self.transport.run(["rm", "-rf", venv], timeout=120)
        await self.transport.run(["mkdir", "-p", f"{home}/venvs", f"{home}/incoming"], timeout=30)
        made = await self.transport.run([self.node.python, "-m", "venv", venv], timeout=300)
        if not made.ok:
            raise RbeeError(
                ErrorCode.INTERNAL_ERROR,
                f"creating the venv on {self.node.name} failed: {made.stderr[-400:]}",
            )
        python = f"{venv}/bin/python"
        target = f"{home}/incoming/{wheel.name}"
        await self.transport.put(wheel, target, self._bar(wheel.name), resume=False)
        spec = f"{target}[{extras}]" if extras else target
        if not offline and not await self._reaches_index(python, home):
            self.step("no package index reachable from the node: installing offline")
            offline = True
        pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        wheels = f"{home}/incoming/wheels"
        if offline:
            await self.transport.run(["rm", "-rf", wheels], timeout=120)
            await self._push_wheels(python, wheel, extras, wheels, llama)
            pip += ["--no-index", "--find-links", wheels]
        self.step(f"installing {wheel.name}{' and its dependencies' if not offline else ''} with pip")
        installed = await self.transport.run([*pip, spec], timeout=1800)
        if not installed.ok:
            await self.transport.run(["rm", "-rf", venv], timeout=120)
            raise RbeeError(
                ErrorCode.INTERNAL_ERROR,
                f"pip install on {self.node.name} failed (the previous install is untouched): "
                f"{installed.stderr[-600:]}",
                hint=f"rbee-keeper setup install --node {self.node.name} --offline",
            )
        version = await self._version(venv)
        await self.transport.run(["sh", "-c", f"echo {digest} > {shlex.quote(venv)}/rbee-wheel.sha256"])
        self.step(f"switching {link} to the new venv")
        switched = await self.transport.run([python, "-c", _SWITCH, venv, link], timeout=120)
        if not switched.ok:
            raise RbeeError(ErrorCode.INTERNAL_ERROR, f"switching venvs failed: {switched.stderr[-400:]}")
        return {"version": version, "offline": offline, **({"wheels": wheels} if offline else {})}

    async def _reaches_index(self, python: str, home: str) -> bool:
        probe = await self.transport.run(
            [python, "-m", "pip", "download", "--quiet", "--no-deps", "--retries", "0", "--timeout", "15",
             "--disable-pip-version-check", "--dest", f"{home}/incoming/probe", INDEX_PROBE],
            timeout=120,
        )  # fmt: skip
        return bool(probe.ok)

    async def _push_wheels(
        self, python: str, wheel: Path, extras: str | None, remote: str, llama: bool
    ) -> None:
        tags = await self.transport.run([python, "-c", _TAGS], timeout=60)
        words = tags.stdout.split()
        if not tags.ok or len(words) < 3:
            raise RbeeError(
                ErrorCode.INTERNAL_ERROR, f"reading {self.node.name}'s platform failed: {tags.stderr}"
            )
        impl, version, platforms = words[0], words[1], words[2:]
        short = "cp" if impl == "cpython" else impl
        self.step(f"gathering wheels for {short}{version} on {platforms[0]} on this machine")
        with tempfile.TemporaryDirectory() as tmp:
            files = await gather_wheels(Path(tmp), wheel, extras, version, platforms, llama)
            await self.transport.run(["mkdir", "-p", remote], timeout=30)
            total = sum(f.stat().st_size for f in files)
            label = f"{self.node.name}: push {len(files)} wheels"
            sent = 0
            for file in files:
                size = file.stat().st_size

                def bar(done: int, _total: int, before: int = sent) -> None:
                    self.progress.update(label, before + done, total)

                await self.transport.put(file, f"{remote}/{file.name}", bar, resume=False)
                sent += size
        if llama:
            await self._push_rpc_server(platforms, remote)

    async def _push_rpc_server(self, platforms: list[str], remote: str) -> None:
        """This machine's ggml-rpc-server, when the node is of its platform: it cannot build one offline."""
        from rbee_control.hive.rpc_build import cached_binary

        binary = cached_binary()
        here = sysconfig.get_platform().replace("-", "_").replace(".", "_")
        if not binary.is_file() or here not in platforms:
            self.step(f"no ggml-rpc-server for {platforms[0]} here: {self.node.name} will try to build one")
            return
        for file in (binary, binary.with_name("ggml-rpc.h")):
            if file.is_file():
                await self.transport.put(file, f"{remote}/{file.name}", self._bar(file.name), resume=False)

    def _bar(self, name: str) -> Any:
        label = f"{self.node.name}: push {name}"
        return lambda done, total: self.progress.update(label, done, total)


async def install_nodes(
    ctx: KeeperContext, nodes: list[Node], options: InstallOptions, service: bool = False
) -> dict[str, Any]:
    """Install on every node at once (one wheel built here); outcomes per node, as `fan_out` gives."""
    display = ctx.display
    _, llama = split_extras(options.extras)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = await build_wheel(Path(tmp))
        display.narrate(f"[dim]built {wheel.name}[/dim]")
        with NodeProgress(display) as progress:
            async with ctx.pool() as pool:

                async def one(transport: Any) -> dict:
                    node = transport.node
                    done = await NodeInstall(node, transport, progress, display).install(wheel, options)
                    if llama:
                        client = NodeClient(node, transport)
                        env = offline_env(done)
                        done["llama"] = await install_llama_on(client, options.backend, display, env)
                    if service:
                        done["service"] = await install_service(node, transport, progress, done["home"])
                    return done

                return await pool.fan_out(nodes, one, timeout=3600)


def offline_env(done: dict[str, Any]) -> dict[str, str] | None:
    """For `install-llama` after an offline install: pip on the node uses only the pushed wheels."""
    from rbee_control.hive.rpc_build import BINARY, PREBUILT_ENV

    wheels = done.get("wheels")
    if not wheels:
        return None
    return {"PIP_NO_INDEX": "1", "RBEE_WHEEL_CACHE": wheels, PREBUILT_ENV: f"{wheels}/{BINARY}"}


async def install_llama_on(
    client: Any, backend: str, display: Display | None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Build llama-cpp-python on the node for what its `detect` finds; pip's lines narrate the build."""
    name = client.node.name

    def narrate(event: Any) -> None:
        message = event.data.get("message") if event.event == "log" else None
        if display is not None and message:
            display.narrate(f"[dim]{name}: {escape(str(message))}[/dim]")

    return await client.call(
        "install-llama", "--backend", backend, progress=narrate, timeout=3 * 3600 + 60, env=env
    )


async def gather_wheels(
    dest: Path, wheel: Path, extras: str | None, py_version: str, platforms: list[str], llama: bool = False
) -> list[Path]:
    """Wheels of `wheel` and its dependencies for another interpreter/platform, via this machine's pip.

    With `llama`, llama-cpp-python too, from the keeper's wheel cache (a CPU build made here or
    copied from a node of the same platform): it has no binary wheels on PyPI.
    """
    from rbee_control.hive.llama_install import LLAMA_VERSION, wheel_cache

    spec = [f"{wheel}[{extras}]" if extras else str(wheel)]
    if llama:
        spec += [f"llama-cpp-python=={LLAMA_VERSION}", "--find-links", str(wheel_cache())]
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--only-binary=:all:", "--python-version", py_version, "--implementation", "cp",
            "--abi", f"cp{py_version}", "--dest", str(dest)]  # fmt: skip
    for platform in platforms:
        argv += ["--platform", platform]
    _, err, code = await _local(*argv, *spec)
    if code:
        hint = "this machine needs a package index (or a pip cache) with wheels for the node's platform"
        if llama and "llama" in err:
            hint = (
                f"no llama-cpp-python {LLAMA_VERSION} wheel for the node's platform in {wheel_cache()}: "
                "install once on a node that can reach an index and copy its wheel there"
            )
        raise RbeeError(
            ErrorCode.DOWNLOAD_FAILED,
            f"gathering wheels for the node failed on this machine: {err.strip()[-600:]}",
            hint=hint,
        )
    return sorted(p for p in dest.iterdir() if p.suffix == ".whl")


def _cached_llama_wheels() -> list[Path]:
    from rbee_control.hive.llama_install import LLAMA_VERSION, wheel_cache

    return sorted(wheel_cache().glob(f"llama_cpp_python-{LLAMA_VERSION}-*.whl"))


async def _local(*argv: str) -> tuple[str, str, int]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return out.decode(errors="replace"), err.decode(errors="replace"), proc.returncode or 0
