"""A node's rbee over its life: prerequisites, an offline install of an older release, a version
mismatch, `setup upgrade` keeping catalog and workers, the boot service, `setup uninstall`.

One sshd node for the module, whose commands see no package index (`PIP_INDEX_URL` at a closed
port, no pip config), a private `$HOME`, and first on `PATH` a `python3` that says it is 3.9 and a
`systemctl` that records its argv. Two full installs in all: the older release, then the upgrade.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from rbee_control import __version__
from tests import sshd

from .conftest import HIVE_ENV, Keeper, Run, make_keeper, rbee_processes

REPO = Path(__file__).resolve().parents[2]
OLD = "0.0.9"
FAKE_PY39 = """#!/bin/sh
case "$*" in *version_info*) echo 3.9.18; exit 0;; esac
exec /usr/bin/python3 "$@"
"""
FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> "{log}"
"""


@dataclass
class LifeNode:
    keeper: Keeper
    old_src: Path
    user_home: Path
    homes: Path
    systemctl_log: Path

    def old_keeper(self, *args: str, timeout: float = 900) -> Run:
        """The keeper of the older release: its source first, this checkout's editable finder removed."""
        code = (
            "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in repr(f)]; "
            f"sys.path.insert(0, {str(self.old_src)!r}); "
            "from rbee_control.keeper.cli import main; sys.exit(main())"
        )
        argv = [sys.executable, "-c", code, "--inventory", str(self.keeper.inventory), *args]
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.keeper.env,
            stdin=subprocess.DEVNULL,
        )
        return Run(list(args), proc.returncode, proc.stdout, proc.stderr, 0.0)


def _old_source(base: Path) -> Path:
    """This checkout's package, released as an older version: what a node runs before an upgrade."""
    src = base / "old-src"
    for name in ("rbee_worker", "rbee_control"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    init = src / "rbee_worker" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{__version__}"', f'__version__ = "{OLD}"'))
    return src


@pytest.fixture(scope="module")
def life(sshd_factory: sshd.SshdFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LifeNode]:
    base = tmp_path_factory.mktemp("life")
    user_home, bin_dir, homes = base / "user-home", base / "bin", base / "homes"
    for d in (user_home, bin_dir, homes):
        d.mkdir()
    log = base / "systemctl.argv"
    for name, text in (("python3", FAKE_PY39), ("systemctl", FAKE_SYSTEMCTL.format(log=log))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    closed = sshd.free_port("127.0.0.1")  # nothing listens there: no package index for the node
    env = {
        "HOME": str(user_home),
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "PIP_CONFIG_FILE": "/dev/null",
        "PIP_INDEX_URL": f"http://127.0.0.1:{closed}/simple",
        **HIVE_ENV,
    }
    node = sshd_factory.start("127.0.0.6").set_env(env)
    ssh = f"{{host: {node.host}, port: {node.port}, user: {node.user}, key: '{node.client_key}'}}"
    inventory = base / "inventory.yaml"
    inventory.write_text(
        "nodes:\n"
        f"  up:\n    ssh: {ssh}\n    home: '{homes / 'up'}'\n    python: /usr/bin/python3\n"
        f"  py39:\n    ssh: {ssh}\n    home: '{homes / 'py39'}'\n"
    )
    keeper = make_keeper(base, inventory)
    sshd.trust_nodes(keeper.config_dir, [node])
    try:
        yield LifeNode(keeper, _old_source(base), user_home, homes, log)
    finally:
        stop = keeper.run("hive", "stop", "--node", "up", timeout=120)
        left = rbee_processes(homes)
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        node.stop()
        assert not left, f"processes left: {[p.info['cmdline'] for p in left]}\n{stop}"


def test_a_node_whose_python_is_too_old_gets_one_line_per_gap_and_the_fix(life: LifeNode) -> None:
    run = life.keeper.run("setup", "install", "--node", "py39", timeout=300)
    assert run.rc == 1, run
    assert "node py39 is missing what rbee needs:" in run.err, run
    line = next(line for line in run.err.splitlines() if "✗" in line)
    assert "Python 3.9.18 at `python3` is older than 3.11" in line, run
    assert "fix: sudo apt-get install python3.12 python3.12-venv" in line, run
    assert "try: rbee-keeper setup install --node py39" in run.err, run
    assert not (life.homes / "py39" / "venv").exists()


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.timeout(1800)  # two full installs; minutes on a loaded 2-core machine
def test_offline_install_mismatch_then_upgrade_keeps_catalog_and_workers(
    life: LifeNode, tiny_model: Path
) -> None:
    home = life.homes / "up"
    old = life.old_keeper("setup", "install", "--node", "up", "--extras", "llama")
    assert old.rc == 0, old
    assert "no package index reachable from the node: installing offline" in old.err, old
    assert f"up: rbee-hive {OLD} (offline)" in old.err, old
    first_venv = (home / "venv").resolve()
    assert first_venv.parent == home / "venvs"

    for args in (
        ("hive", "start", "--node", "up"),
        ("models", "add", f"file:{tiny_model}", "--node", "up"),
        ("worker", "spawn", "--node", "up", "--model", "tiny"),
    ):
        done = life.old_keeper(*args, timeout=300)
        assert done.rc == 0, done
    model_file = home / "models" / "tiny.gguf"
    assert model_file.exists()

    mismatch = life.keeper.run("worker", "list", "--node", "up")
    assert mismatch.rc == 1, mismatch
    assert f"node up runs rbee {OLD}, this keeper is rbee {__version__}" in mismatch.err, mismatch
    assert "setup upgrade --node up" in mismatch.err, mismatch

    up = life.keeper.run("setup", "upgrade", "--node", "up", timeout=900)
    assert up.rc == 0, up
    assert f"up: rbee-hive {OLD} → rbee-hive {__version__}; 1 worker(s) back: tiny" in up.err, up
    assert (home / "venv").resolve() != first_venv and first_venv.exists(), "the previous venv is kept"
    assert model_file.exists()
    models = life.keeper.run("models", "list", "--node", "up", json_mode=True)
    assert models.rc == 0 and [m["name"] for m in models.json()["up"]] == ["tiny"], models
    workers = life.keeper.run("worker", "list", "--node", "up", json_mode=True)
    assert workers.rc == 0, workers
    assert [w["model"] for w in workers.json()["up"]] == ["tiny"], workers

    # the same build again: nothing reinstalled; --service writes and enables the unit
    service = life.keeper.run("setup", "install", "--node", "up", "--service", timeout=600)
    assert service.rc == 0 and "already installed" in service.err, service
    unit = life.user_home / ".config" / "systemd" / "user" / "rbee-hive-up.service"
    text = unit.read_text()
    assert f"ExecStart={home}/venv/bin/rbee-hive --home {home} daemon --address" in text
    assert f"Environment=RBEE_HOME={home}" in text and "WantedBy=default.target" in text
    assert life.systemctl_log.read_text().splitlines() == [
        "--user daemon-reload",
        "--user enable rbee-hive-up.service",
    ]
    assert "loginctl enable-linger" in service.err, service

    gone = life.keeper.run("setup", "uninstall", "--node", "up", timeout=300)
    assert gone.rc == 0, gone
    assert not (home / "venv").exists() and not (home / "venvs").exists() and not unit.exists()
    assert model_file.exists() and (home / "models.db").exists(), "models are kept without --purge"
    assert life.systemctl_log.read_text().splitlines()[-1] == "--user disable rbee-hive-up.service"


def test_the_old_keeper_source_is_another_release(life: LifeNode) -> None:
    """Guards the fixture: a copy that did not change the version would make the upgrade test vacuous."""
    version = life.old_keeper("--version")
    assert version.rc == 0 and version.out.strip() == f"rbee-keeper {OLD}", version
