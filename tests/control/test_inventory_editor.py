"""add-node / remove-node: only the node's lines change, failures change nothing, writes are atomic."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rbee_control.inventory import atomic
from rbee_control.inventory.editor import add_node, remove_node
from rbee_control.inventory.loader import load_inventory
from rbee_worker.protocol.errors import ErrorCode, RbeeError

ORIGINAL = """\
# my fleet — edited by hand
defaults: {ssh_user: me, models_dir: ~/.local/share/rbee/models}

nodes:
  local:                      # embedded default: no SSH
    transport: local

  # the mac in the study
  mac:
    ssh: {host: mac.home.arpa, port: 22, user: me, key: ~/.ssh/id_ed25519}
    address: mac.home.arpa    # where workers are reachable over HTTP
    backends: [metal, cpu]
    home: ~/.local/share/rbee # $RBEE_HOME on that node

  spare:
    ssh:
      host: 10.0.0.9
      port: 2222   # non-standard
# trailing comment about nothing
"""

GPU_FIELDS = {"ssh": {"host": "10.0.0.5", "port": 22, "user": None}, "backends": ["cuda", "cpu"]}
GPU_BLOCK = """\

  gpu:
    ssh: {host: 10.0.0.5, port: 22}
    backends: [cuda, cpu]
"""


@pytest.fixture
def inventory_file(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(ORIGINAL)
    path.chmod(0o640)
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_add_node_only_appends_the_node(inventory_file: Path) -> None:
    inv = add_node(inventory_file, "gpu", GPU_FIELDS)
    head, tail = ORIGINAL.split("# trailing comment")
    assert inventory_file.read_text() == head + GPU_BLOCK + "# trailing comment" + tail
    assert inv.names() == ["local", "mac", "spare", "gpu"]
    assert inv.node("gpu").backends == ("cuda", "cpu")
    assert oct(inventory_file.stat().st_mode & 0o777) == oct(0o640)
    assert leftovers(inventory_file.parent) == []


def test_remove_node_takes_its_comment_block_and_nothing_else(inventory_file: Path) -> None:
    remove_node(inventory_file, "mac")
    removed = """\
  # the mac in the study
  mac:
    ssh: {host: mac.home.arpa, port: 22, user: me, key: ~/.ssh/id_ed25519}
    address: mac.home.arpa    # where workers are reachable over HTTP
    backends: [metal, cpu]
    home: ~/.local/share/rbee # $RBEE_HOME on that node

"""
    assert inventory_file.read_text() == ORIGINAL.replace(removed, "")
    assert load_inventory(inventory_file).names() == ["local", "spare"]


def test_add_then_remove_is_byte_identical(inventory_file: Path) -> None:
    add_node(inventory_file, "gpu", GPU_FIELDS)
    remove_node(inventory_file, "gpu")
    assert inventory_file.read_text() == ORIGINAL


def test_remove_last_node_leaves_an_empty_mapping(inventory_file: Path) -> None:
    for name in ("local", "mac", "spare"):
        remove_node(inventory_file, name)
    text = inventory_file.read_text()
    assert "nodes: {}\n" in text
    assert text.startswith("# my fleet — edited by hand\ndefaults: {ssh_user: me,")
    assert "# trailing comment about nothing" in text
    assert len(load_inventory(inventory_file)) == 0


def test_add_follows_the_files_indentation(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    original = "nodes:\n    a:\n        transport: local\n"
    path.write_text(original)
    add_node(path, "b", {"transport": "local", "home": "/srv/rbee-b"})
    assert path.read_text() == original + "    b:\n        transport: local\n        home: /srv/rbee-b\n"


def test_add_creates_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    add_node(path, "local", {"transport": "local"})
    assert path.read_text() == "nodes:\n  local:\n    transport: local\n"


def test_flow_style_nodes_fall_back_to_a_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    path.write_text("# keep me\nnodes: {a: {transport: local}}\n")
    inv = add_node(path, "b", {"transport": "local"})
    assert inv.names() == ["a", "b"]
    assert "# keep me" in path.read_text()


def test_symlinked_inventory_stays_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "inventory.yaml"
    real.parent.mkdir()
    real.write_text(ORIGINAL)
    link = tmp_path / "inventory.yaml"
    link.symlink_to(real)
    add_node(link, "gpu", GPU_FIELDS)
    assert link.is_symlink()
    assert "gpu:" in real.read_text()


@pytest.mark.parametrize(
    ("edit", "code", "message"),
    [
        (lambda p: add_node(p, "mac", {"transport": "local"}), ErrorCode.INVALID_REQUEST, "already exists"),
        (
            lambda p: add_node(p, "bad name", {"transport": "local"}),
            ErrorCode.INVALID_REQUEST,
            "invalid node",
        ),
        (
            lambda p: add_node(p, "gpu", {"ssh": {"host": "h", "port": 70000}}),
            ErrorCode.INVENTORY_INVALID,
            "nodes.gpu.ssh.port: expected an integer 1–65535",
        ),
        (
            lambda p: add_node(p, "gpu", {"sssh": {"host": "h"}}),
            ErrorCode.INVENTORY_INVALID,
            "did you mean 'ssh'",
        ),
        (lambda p: add_node(p, "gpu", {"home": object()}), ErrorCode.INVALID_REQUEST, "cannot store"),
        (lambda p: remove_node(p, "mca"), ErrorCode.UNKNOWN_NODE, "did you mean 'mac'?"),
    ],
)
def test_failed_edit_leaves_the_file_byte_identical(
    inventory_file: Path, edit, code: str, message: str
) -> None:
    before = inventory_file.stat()
    with pytest.raises(RbeeError) as info:
        edit(inventory_file)
    assert info.value.code == code
    assert message in info.value.message
    after = inventory_file.stat()
    assert inventory_file.read_text() == ORIGINAL
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert leftovers(inventory_file.parent) == []


def test_edit_of_an_invalid_inventory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    broken = "nodes:\n  a:\n    transport: lcoal\n"
    path.write_text(broken)
    with pytest.raises(RbeeError, match=r"inventory.yaml:3:16: nodes.a.transport"):
        add_node(path, "b", {"transport": "local"})
    assert path.read_text() == broken


def test_write_is_atomic_when_the_rename_fails(inventory_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        add_node(inventory_file, "gpu", GPU_FIELDS)
    assert inventory_file.read_text() == ORIGINAL
    assert leftovers(inventory_file.parent) == []


def test_new_file_gets_default_mode(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    add_node(path, "local", {"transport": "local"})
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.access(path, os.R_OK)
