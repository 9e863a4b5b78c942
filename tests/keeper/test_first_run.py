"""A new operator's first commands: the first inventory, options anywhere, `--version`, and the
files and lines that `setup install` writes without a node (prerequisites, boot services)."""

from __future__ import annotations

import json
import os
import plistlib
import subprocess
import sys
from pathlib import Path

import pytest

from rbee_control import __version__
from rbee_control.inventory.model import Node
from rbee_control.inventory.paths import default_inventory_path
from rbee_control.keeper.prerequisites import NodeFacts, missing
from rbee_control.keeper.service import launchd_agent, systemd_unit
from tests import sshd

REPO = Path(__file__).resolve().parents[2]


def keeper(*args: str, config: Path, cwd: Path = REPO, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RBEE_", "XDG_"))}
    env.update({"RBEE_CONFIG_DIR": str(config), "COLUMNS": "200", **extra})
    return subprocess.run(
        [sys.executable, "-m", "rbee_control.keeper.cli", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_first_add_node_creates_the_per_user_inventory_not_the_repository_example(
    keeper_sshd_nodes: list[sshd.SshdNode], tmp_path: Path
) -> None:
    node, config = keeper_sshd_nodes[0], tmp_path / "config"
    example = (REPO / "inventory.yaml").read_bytes()
    listed = keeper("setup", "list-nodes", config=config)
    assert listed.returncode == 1 and "rbee-keeper setup add-node" in listed.stderr, listed.stderr

    add = keeper(
        "setup", "add-node", "box", "--ssh-host", node.host, "--ssh-port", str(node.port),
        "--ssh-user", node.user, "--ssh-key", str(node.client_key), "--home", str(tmp_path / "box"),
        "--trust", config=config,
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    created = config / "inventory.yaml"
    assert f"created the inventory {created} (with the node local)" in add.stderr
    assert f"added node box to {created}" in add.stdout
    text = created.read_text()
    assert (
        text.startswith("# rbee inventory")
        and "  local:  " in text
        and "    transport: local\n" in text
        and "  box:" in text
    )
    assert (REPO / "inventory.yaml").read_bytes() == example, "the repository's example must not change"

    # global options after the subcommand, and before it
    after = keeper("setup", "list-nodes", "--json", config=config)
    before = keeper("--json", "setup", "list-nodes", config=config)
    assert after.returncode == 0 and after.stdout == before.stdout, after.stderr
    assert '"name": "box"' in after.stdout
    named = keeper(
        "setup", "list-nodes", "--inventory", str(REPO / "inventory.yaml"), "--json", config=config
    )
    assert named.returncode == 0 and '"box"' not in named.stdout and '"local"' in named.stdout


def test_add_node_local_into_a_new_inventory_is_refused_before_connecting(tmp_path: Path) -> None:
    run = keeper("setup", "add-node", "local", "--ssh-host", "127.0.0.9", config=tmp_path / "config")
    assert run.returncode == 1
    assert "node 'local' already is this machine in the new inventory" in run.stderr, run.stderr
    assert not (tmp_path / "config" / "inventory.yaml").exists()


def test_xdg_config_home_is_honoured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RBEE_CONFIG_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_inventory_path() == tmp_path / "rbee" / "inventory.yaml"


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("rbee_control.keeper.cli", "rbee-keeper"),
        ("rbee_control.hive.cli", "rbee-hive"),
        ("rbee_worker.cli", "rbee-worker"),
        ("rbee_control.queen.cli", "queen-rbee"),
    ],
)
def test_every_cli_answers_version(module: str, name: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and run.stdout.strip() == f"{name} {__version__}", run


def _node(**fields: object) -> Node:
    base: dict[str, object] = dict(
        name="mac", transport="ssh", address="10.0.0.5", home="/h", python="python3",
        backends=("cpu",), ssh=None, labels={}, models_dir=None,
    )  # fmt: skip
    return Node(**{**base, **fields})  # type: ignore[arg-type]


def _facts(**fields: object) -> NodeFacts:
    text = "os=Linux\narch=x86_64\nhome_dir=/home/me\nxdg_config=\nuser=me\npython=3.12.1\nvenv=yes\n"
    text += "free_kb=99999999\ncompiler=/usr/bin/cc\n"
    facts = NodeFacts.parse(text)
    return NodeFacts(**{**{f: getattr(facts, f) for f in facts.__slots__}, **fields})  # type: ignore[arg-type]


def test_prerequisites_one_line_per_gap_with_its_fix() -> None:
    assert missing(_node(), _facts(), "/h", needs_compiler=True) == []
    gaps = missing(
        _node(), _facts(venv=False, free_bytes=10 << 20, compiler=None), "/h/rbee", needs_compiler=True
    )
    assert gaps == [
        "Python at `python3` has no venv module (ensurepip) — fix: sudo apt-get install python3.12-venv",
        "only 10 MB free under /h/rbee (1 GB needed) — "
        "fix: free space there (du -sh /h/rbee/* ; df -h /h/rbee)",
        "no C compiler to build llama-cpp-python — fix: sudo apt-get install build-essential cmake",
    ]
    mac = missing(_node(), _facts(os="Darwin", arch="arm64", python=None, compiler=None), "/h", True)
    assert mac[0].startswith("no Python at `python3` — fix: brew install python@3.12")
    assert mac[1] == "no C compiler to build llama-cpp-python — fix: xcode-select --install"
    odd = missing(_node(), _facts(os="FreeBSD", arch="riscv64"), "/h", needs_compiler=False)
    assert [line.split(" — ")[0] for line in odd] == [
        "OS FreeBSD is not supported",
        "CPU riscv64 is not supported",
    ]
    assert NodeFacts.parse("garbage\npython=\nfree_kb=x\n").python is None


def test_systemd_unit_runs_the_hive_from_the_venv_link_and_quotes_paths() -> None:
    unit = systemd_unit(_node(models_dir="/srv/models"), "/home/me/my rbee", "/home/me/.config", "me")
    assert unit.path == "/home/me/.config/systemd/user/rbee-hive-mac.service"
    assert (
        'ExecStart="/home/me/my rbee/venv/bin/rbee-hive" --home "/home/me/my rbee" daemon --address 10.0.0.5'
        in unit.text
    )
    assert 'Environment="RBEE_HOME=/home/me/my rbee"' in unit.text
    assert "Environment=RBEE_MODELS_DIR=/srv/models" in unit.text
    assert "Restart=on-failure" in unit.text and "WantedBy=default.target" in unit.text
    assert unit.enable == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "rbee-hive-mac.service"],
    ]
    assert "sudo loginctl enable-linger me" in unit.note


def test_launchd_agent_is_a_valid_plist_that_runs_the_hive() -> None:
    agent = launchd_agent(_node(), "/Users/me/rbee & co", "/Users/me")
    assert agent.path == "/Users/me/Library/LaunchAgents/org.rbee.hive.mac.plist"
    plist = plistlib.loads(agent.text.encode())
    assert plist["Label"] == "org.rbee.hive.mac"
    home = "/Users/me/rbee & co"
    assert plist["ProgramArguments"] == [
        f"{home}/venv/bin/rbee-hive", "--home", home, "daemon", "--address", "10.0.0.5",
    ]  # fmt: skip
    assert plist["EnvironmentVariables"] == {"RBEE_HOME": "/Users/me/rbee & co"}
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert agent.enable == [["launchctl", "load", "-w", agent.path]]


def test_a_hive_refuses_a_keeper_of_another_release(tmp_path: Path) -> None:
    env = {**os.environ, "RBEE_KEEPER_VERSION": "9.9.9"}
    argv = [
        sys.executable,
        "-m",
        "rbee_control.hive.cli",
        "--home",
        str(tmp_path),
        "--json",
        "models",
        "list",
    ]
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 1
    error = json.loads(run.stdout.splitlines()[-1])
    assert (error["event"], error["code"]) == ("error", "VERSION_MISMATCH"), error
    assert f"runs rbee {__version__}, this keeper is rbee 9.9.9" in error["message"]
    assert error["hint"] == "rbee-keeper setup upgrade --node <node>"
    same = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env={**env, "RBEE_KEEPER_VERSION": __version__}
    )
    assert same.returncode == 0, same.stderr
