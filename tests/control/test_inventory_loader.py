"""inventory.yaml loading: defaults, every error located at file:line:col, hostile input refused."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from rbee_control.inventory.loader import find_inventory, load_inventory, parse_inventory
from rbee_control.inventory.model import DEFAULT_HOME
from rbee_control.inventory.yaml_source import MAX_BYTES
from rbee_worker.protocol.errors import ErrorCode, RbeeError

DESIGN_EXAMPLE = """\
defaults: {ssh_user: me, models_dir: ~/.local/share/rbee/models}
nodes:
  local:                      # embedded default: no SSH
    transport: local
  mac:
    ssh: {host: mac.home.arpa, port: 22, user: me, key: ~/.ssh/id_ed25519}
    address: mac.home.arpa    # where workers are reachable over HTTP
    backends: [metal, cpu]
    home: ~/.local/share/rbee # $RBEE_HOME on that node
    python: python3
  gpu:
    ssh:
      host: 10.0.0.7
    labels: {gpu: rtx3090, vram_gb: 24, spare: true}
"""


def invalid(text: str) -> str:
    with pytest.raises(RbeeError) as info:
        parse_inventory(text, "inventory.yaml")
    assert info.value.code == ErrorCode.INVENTORY_INVALID
    return info.value.message


def test_design_example_loads_with_defaults_applied() -> None:
    inv = parse_inventory(DESIGN_EXAMPLE, "inventory.yaml")
    assert inv.names() == ["local", "mac", "gpu"]
    local, mac, gpu = inv.node("local"), inv.node("mac"), inv.node("gpu")
    assert (local.transport, local.address, local.ssh, local.home) == (
        "local",
        "127.0.0.1",
        None,
        DEFAULT_HOME,
    )
    assert mac.transport == "ssh"
    assert mac.ssh is not None and mac.ssh.port == 22 and mac.ssh.key == "~/.ssh/id_ed25519"
    assert mac.backends == ("metal", "cpu")
    assert gpu.transport == "ssh" and gpu.address == "10.0.0.7"
    assert gpu.ssh is not None and (gpu.ssh.user, gpu.ssh.port) == ("me", 22)
    assert gpu.backends == ("cpu",) and gpu.python == "python3"
    assert gpu.labels == {"gpu": "rtx3090", "vram_gb": "24", "spare": "true"}
    assert gpu.models_dir == "~/.local/share/rbee/models"


def test_empty_file_has_no_nodes() -> None:
    assert len(parse_inventory("", "inventory.yaml")) == 0
    assert len(parse_inventory("# nothing yet\nnodes:\n", "inventory.yaml")) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "nodes:\n  mac:\n    ssh:\n      host: mac\n      port: 70000\n",
            "inventory.yaml:5:13: nodes.mac.ssh.port: expected an integer 1–65535",
        ),
        (
            "nodes:\n  mac:\n    ssh: {host: mac, port: '22'}\n",
            "inventory.yaml:3:28: nodes.mac.ssh.port: expected an integer 1–65535",
        ),
        (
            "nodes:\n  mac:\n    ssh: {host: mac, port: true}\n",
            "inventory.yaml:3:28: nodes.mac.ssh.port: expected an integer 1–65535",
        ),
        (
            "nodes:\n  mac:\n    shh: {host: mac}\n",
            "inventory.yaml:3:5: nodes.mac.shh: unknown key; did you mean 'ssh'?",
        ),
        (
            "nodes:\n  mac:\n    ssh: {host: mac, prot: 22}\n",
            "inventory.yaml:3:22: nodes.mac.ssh.prot: unknown key; did you mean 'port'?",
        ),
        (
            "nodez:\n  mac: {transport: local}\n",
            "inventory.yaml:1:1: nodez: unknown key; did you mean 'nodes'?",
        ),
        (
            "nodes:\n  mac:\n    transport: local\n    colour: blue\n",
            "inventory.yaml:4:5: nodes.mac.colour: unknown key (expected one of: transport, ssh, address,"
            " home, python, backends, labels, models_dir)",
        ),
        (
            "nodes:\n  mac:\n    ssh:\n      port: 22\n",
            "inventory.yaml:3:5: nodes.mac.ssh: missing required key 'host'",
        ),
        (
            "nodes:\n  mac:\n    address: mac\n",
            "inventory.yaml:2:3: nodes.mac: no 'ssh' block; add ssh: {host: …} or set transport: local",
        ),
        (
            "nodes:\n  mac:\n    transport: sssh\n",
            "inventory.yaml:3:16: nodes.mac.transport: expected 'local' or 'ssh'; did you mean 'ssh'?",
        ),
        (
            "nodes:\n  mac:\n    transport: ssh\n",
            "inventory.yaml:3:5: nodes.mac: transport ssh needs an 'ssh' block with a host",
        ),
        (
            "nodes:\n  mac:\n    transport: local\n    ssh: {host: mac}\n",
            "inventory.yaml:4:5: nodes.mac.ssh: only used with transport: ssh;"
            " remove it or set transport: ssh",
        ),
        (
            "nodes:\n  'my mac':\n    transport: local\n",
            "inventory.yaml:2:3: nodes: invalid node name 'my mac':"
            " use 1–64 letters, digits, '.', '_' or '-'",
        ),
        (
            "nodes:\n  m:\n    transport: local\n    backends: [cpu, cdua]\n",
            "inventory.yaml:4:21: nodes.m.backends[1]: unknown backend 'cdua' (expected one of: cpu, cuda,"
            " metal); did you mean 'cuda'?",
        ),
        (
            "nodes:\n  m:\n    transport: local\n    backends:\n      - cpu\n      - cpu\n",
            "inventory.yaml:6:9: nodes.m.backends[1]: backend 'cpu' listed twice",
        ),
        (
            "nodes:\n  m:\n    transport: local\n    backends: []\n",
            "inventory.yaml:4:15: nodes.m.backends: expected a non-empty list of backends (cpu, cuda, metal)",
        ),
        (
            "nodes:\n  m:\n    transport: local\n    home: rbee-home\n",
            "inventory.yaml:4:11: nodes.m.home: expected an absolute path or one starting with ~/",
        ),
        (
            "nodes:\n  m:\n    ssh: {host: 'http://mac'}\n",
            "inventory.yaml:3:17: nodes.m.ssh.host:"
            " expected a host name or IP address (no scheme, path or spaces)",
        ),
        (
            "nodes:\n  m:\n    ssh: {host: mac, user: 1000}\n",
            "inventory.yaml:3:28: nodes.m.ssh.user: expected a string (quote it)",
        ),
        (
            "nodes:\n  m:\n    transport: local\n    labels: {gpu: [a, b]}\n",
            "inventory.yaml:4:19: nodes.m.labels.gpu: expected a string, number or boolean",
        ),
        ("- a\n- b\n", "inventory.yaml:1:1: expected a mapping"),
        ("nodes: [a, b]\n", "inventory.yaml:1:8: nodes: expected a mapping of node names to nodes"),
        ("defaults: {ssh_port: 0}\n", "inventory.yaml:1:22: defaults.ssh_port: expected an integer 1–65535"),
        (
            "nodes: {m: {transport: local}\n",
            "inventory.yaml:2:1: expected ',' or '}', but got '<stream end>' (while parsing a flow mapping)",
        ),
        (
            "nodes:\n  m:\n    transport: local\n   bad: indent\n",
            "inventory.yaml:4:4: expected <block end>, but found '<block mapping start>'"
            " (while parsing a block mapping)",
        ),
        (
            "nodes:\n  m: {transport: local}\n  m: {transport: local}\n",
            "inventory.yaml:3:3: duplicate key 'm'",
        ),
        (
            "nodes:\n\tm: {}\n",
            "inventory.yaml:2:1: found character '\\t' that cannot start any token"
            " (while scanning for the next token)",
        ),
    ],
)
def test_errors_name_file_line_and_column(text: str, message: str) -> None:
    assert invalid(text) == message


def test_error_uses_the_file_name_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "inv.yaml").write_text("nodes:\n  mac:\n    ssh: {host: mac, port: 0}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RbeeError) as info:
        load_inventory("inv.yaml")
    assert info.value.message == "inv.yaml:3:28: nodes.mac.ssh.port: expected an integer 1–65535"
    assert info.value.details == {"file": "inv.yaml", "line": 3, "column": 28}


def test_invalid_utf8_is_located(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_bytes(b"nodes:\n  m\xff: {transport: local}\n")
    with pytest.raises(RbeeError, match=r"inventory.yaml:2:4: not valid UTF-8 text"):
        load_inventory(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RbeeError, match="file not found"):
        load_inventory(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &x [1]\nnodes: {}\n", "inventory.yaml:1:4: anchors (&name) are not allowed"),
        ("nodes: !!python/object/apply:os.system ['echo pwned']\n", "inventory.yaml:1:8: YAML tags"),
        ("nodes: !node {}\n", "inventory.yaml:1:8: YAML tags (!node) are not allowed"),
        ("nodes: {}\n---\nnodes: {}\n", "inventory.yaml:2:1: more than one YAML document"),
    ],
)
def test_hostile_constructs_are_refused(text: str, message: str) -> None:
    assert invalid(text).startswith(message)


def test_python_tags_never_execute(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    invalid(f"nodes: !!python/object/apply:os.system ['touch {marker}']\n")
    invalid(f"x: !!python/object/new:subprocess.check_call [['touch', '{marker}']]\n")
    assert not marker.exists()


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    tracemalloc.start()
    try:
        assert "anchors (&name) are not allowed" in invalid("\n".join(lines) + "\n")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, f"refused before expanding: {peak} bytes at peak"  # 9**10 items if expanded


def test_deep_nesting_is_refused_without_recursion_error() -> None:
    assert "nested deeper than" in invalid("nodes: " + "[" * 5000 + "]" * 5000 + "\n")


def test_oversized_file_is_not_parsed(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_bytes(b"# " + b"x" * MAX_BYTES + b"\n")
    with pytest.raises(RbeeError, match=r"inventory.yaml: file is larger than 1024 KiB"):
        load_inventory(path)


def test_unknown_node_suggests_the_closest_name() -> None:
    inv = parse_inventory(DESIGN_EXAMPLE, "inventory.yaml")
    with pytest.raises(RbeeError) as info:
        inv.node("mca")
    err = info.value
    assert err.code == ErrorCode.UNKNOWN_NODE
    assert err.message == "unknown node 'mca' (known: local, mac, gpu); did you mean 'mac'?"
    assert err.hint == "rbee-keeper setup list-nodes"


def test_find_inventory_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config"
    config.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("RBEE_CONFIG_DIR", str(config))
    monkeypatch.delenv("RBEE_INVENTORY", raising=False)
    monkeypatch.chdir(work)

    (work / "inventory.yaml").write_text("nodes: {}\n")  # never picked up from the current directory
    with pytest.raises(RbeeError) as info:
        find_inventory(None)
    assert "looked at --inventory, $RBEE_INVENTORY, " in info.value.message
    assert str(config / "inventory.yaml") in info.value.message

    (config / "inventory.yaml").write_text("nodes: {}\n")
    assert find_inventory(None) == config / "inventory.yaml"
    env_file = tmp_path / "env.yaml"
    env_file.write_text("nodes: {}\n")
    monkeypatch.setenv("RBEE_INVENTORY", str(env_file))
    assert find_inventory(None) == env_file
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("nodes: {}\n")
    assert find_inventory(str(explicit)) == explicit
    with pytest.raises(RbeeError, match=r"from --inventory\) does not exist"):
        find_inventory(str(tmp_path / "missing.yaml"))
    monkeypatch.setenv("RBEE_INVENTORY", os.fspath(tmp_path / "gone.yaml"))
    with pytest.raises(RbeeError, match=r"from \$RBEE_INVENTORY\) does not exist"):
        find_inventory(None)
