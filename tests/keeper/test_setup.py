"""`rbee-keeper setup …` against real sshd nodes: host keys, inventory edits, and input errors."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import asyncssh
import pytest

from rbee_control.ssh.known_hosts import fingerprint
from tests import sshd

from .conftest import Keeper, make_keeper

INVENTORY = """\
# my fleet: hand-written, comments must survive the CLI's edits
defaults: {ssh_user: me}   # applies to every node
nodes:
  # the box I type on
  local:
    transport: local
    home: '{home}'   # per-test home
"""


@pytest.fixture
def keeper(tmp_path: Path) -> Keeper:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(INVENTORY.replace("{home}", str(tmp_path / "homes" / "local")))
    return make_keeper(tmp_path, inventory)


@pytest.fixture
def node(keeper_sshd_nodes: list[sshd.SshdNode]) -> sshd.SshdNode:
    return keeper_sshd_nodes[0]


def add_node_args(name: str, node: sshd.SshdNode, home: Path, *extra: str) -> list[str]:
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "venv").exists():
        (home / "venv").symlink_to(sys.prefix)
    return [
        "setup", "add-node", name,
        "--ssh-host", node.host, "--ssh-port", str(node.port),
        "--ssh-user", node.user, "--ssh-key", str(node.client_key),
        "--home", str(home), *extra,
    ]  # fmt: skip


def test_add_node_with_trust_pins_key_keeps_comments_and_narrates_checks(
    keeper: Keeper, node: sshd.SshdNode, tmp_path: Path
) -> None:
    before = keeper.inventory.read_text()
    run = keeper.run(*add_node_args("n2", node, tmp_path / "homes" / "n2", "--trust"))
    assert run.rc == 0, run

    after = keeper.inventory.read_text()
    assert after.startswith(before), "the existing text (comments, layout) must be kept byte for byte"
    assert "  n2:" in after and f"port: {node.port}" in after
    listed = keeper.run("setup", "list-nodes", json_mode=True).json()["nodes"]
    assert [n["name"] for n in listed] == ["local", "n2"]

    pinned = (keeper.config_dir / "known_hosts").read_text()
    assert f"[{node.host}]:{node.port} {node.host_public_key.split()[0]}" in pinned
    assert node.host_public_key.split()[1] in pinned

    checks = [line for line in run.err.splitlines() if line.startswith("✓")]
    labels = [line.split(":")[0].removeprefix("✓ ") for line in checks]
    for label in (
        "connection reachable",
        "key authentication",
        "command execution",
        "latency",
        "rbee-hive found",
    ):
        assert label in labels, run
    assert fingerprint(node.host_key) in run.err
    assert f"added node n2 to {keeper.inventory}" in run.out


def test_add_node_unknown_host_key_refused_without_trust(
    keeper: Keeper, node: sshd.SshdNode, tmp_path: Path
) -> None:
    before = keeper.inventory.read_bytes()
    run = keeper.run(*add_node_args("n2", node, tmp_path / "homes" / "n2"))
    assert run.rc == 1, run
    assert "HOST_KEY_UNKNOWN" in run.err
    assert fingerprint(node.host_key) in run.err
    assert keeper.inventory.read_bytes() == before
    assert not (keeper.config_dir / "known_hosts").exists()

    # the suggested command is the operator's own command plus --trust, and it works as is
    hint = next(line for line in run.err.splitlines() if line.strip().startswith("try:"))
    words = shlex.split(hint.split("try:", 1)[1])
    assert words[:3] == ["rbee-keeper", "--inventory", str(keeper.inventory)] and words[-1] == "--trust"
    for option in ("--ssh-user", "--ssh-key", "--home"):
        assert option in words, hint
    retried = keeper.run(*words[3:])
    assert retried.rc == 0, retried

    as_json = keeper.run(*add_node_args("n9", node, tmp_path / "homes" / "n2"), json_mode=True)
    assert as_json.rc == 0, "once pinned, the key is trusted for any node name on that host:port"


def test_add_node_changed_host_key_refused(
    keeper: Keeper, sshd_factory: sshd.SshdFactory, tmp_path: Path
) -> None:
    """A different sshd (another host key) on the same host:port as a pinned one: refused."""
    first = sshd_factory.start("127.0.0.3")
    try:
        assert keeper.run(*add_node_args("n3", first, tmp_path / "homes" / "n3", "--trust")).rc == 0
    finally:
        first.stop()
    impostor = sshd_factory.start("127.0.0.3", port=first.port)
    try:
        assert impostor.host_public_key != first.host_public_key
        before = keeper.inventory.read_bytes()
        pins = (keeper.config_dir / "known_hosts").read_bytes()
        for extra in ((), ("--trust",)):
            run = keeper.run(*add_node_args("n4", impostor, tmp_path / "homes" / "n4", *extra))
            assert run.rc == 1, run
            assert "HOST_KEY_CHANGED" in run.err and fingerprint(impostor.host_key) in run.err
            assert keeper.inventory.read_bytes() == before
            assert (keeper.config_dir / "known_hosts").read_bytes() == pins

        # the node already in the inventory is refused too, and reported as such by status
        status = keeper.run("status", "--node", "n3", json_mode=True)
        assert status.rc == 1
        assert status.json()["n3"]["error"]["code"] == "HOST_KEY_CHANGED"
    finally:
        impostor.stop()


def test_add_node_checks_name_before_connecting(keeper: Keeper, node: sshd.SshdNode, tmp_path: Path) -> None:
    before = keeper.inventory.read_bytes()
    for name in ("bad;name", "local"):
        run = keeper.run(*add_node_args(name, node, tmp_path / "homes" / "x", "--trust"))
        assert run.rc == 1, run
        assert "INVALID_REQUEST" in run.err
        assert "✓" not in run.err, "nothing should be contacted for a name that cannot be recorded"
        assert not (keeper.config_dir / "known_hosts").exists()
        assert keeper.inventory.read_bytes() == before


def test_list_nodes_json_and_remove_node(keeper: Keeper, node: sshd.SshdNode, tmp_path: Path) -> None:
    assert keeper.run(*add_node_args("n2", node, tmp_path / "homes" / "n2", "--trust")).rc == 0
    nodes = keeper.run("setup", "list-nodes", json_mode=True).json()["nodes"]
    by_name = {n["name"]: n for n in nodes}
    assert by_name["local"]["transport"] == "local"
    assert by_name["n2"] == {
        "name": "n2",
        "transport": "ssh",
        "ssh": f"{node.user}@{node.host}:{node.port}",
        "address": node.host,
        "home": str(tmp_path / "homes" / "n2"),
        "backends": "cpu",
    }
    human = keeper.run("setup", "list-nodes")
    assert human.rc == 0 and "n2" in human.out and f"{node.host}:{node.port}" in human.out

    typo = keeper.run("setup", "remove-node", "n22")
    assert typo.rc == 1 and "UNKNOWN_NODE" in typo.err and "did you mean 'n2'" in typo.err

    removed = keeper.run("setup", "remove-node", "n2")
    assert removed.rc == 0, removed
    text = keeper.inventory.read_text()
    assert "n2" not in text
    assert text == INVENTORY.replace("{home}", str(tmp_path / "homes" / "local")), "comments and layout kept"
    assert [n["name"] for n in keeper.run("setup", "list-nodes", json_mode=True).json()["nodes"]] == ["local"]


def test_malformed_inventory_names_file_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "inventory.yaml"
    bad.write_text("nodes:\n  a:\n    transport: local\n   b: [\n")
    keeper = make_keeper(tmp_path, bad)
    for args in (
        ("status",),
        ("infer", "--node", "a", "--model", "m", "--prompt", "hi"),
        ("setup", "list-nodes"),
    ):
        run = keeper.run(*args)
        assert run.rc == 1, run
        assert "INVENTORY_INVALID" in run.err
        assert re.search(rf"{re.escape(str(bad))}:4:\d+", run.err), run
        assert "Traceback" not in run.err
    assert bad.read_text() == "nodes:\n  a:\n    transport: local\n   b: [\n"


def test_unknown_node_and_usage_errors(keeper: Keeper) -> None:
    run = keeper.run("infer", "--node", "lcoal", "--model", "tiny", "--prompt", "hi")
    assert run.rc == 1, run
    assert "UNKNOWN_NODE" in run.err and "did you mean 'local'" in run.err
    assert "rbee-keeper setup list-nodes" in run.err
    assert run.out == ""
    usage = keeper.run("infer", "--node", "local", "--prompt", "hi")
    assert usage.rc == 2 and "--model" in usage.err


def test_auth_failure_hint_is_a_runnable_ssh_command(
    keeper: Keeper, node: sshd.SshdNode, tmp_path: Path
) -> None:
    args = add_node_args("n2", node, tmp_path / "homes" / "n2", "--trust")
    args[args.index("--ssh-user") + 1] = "nobody"
    run = keeper.run(*args)
    assert run.rc == 1 and "CONNECTION_FAILED" in run.err
    hint = next(line for line in run.err.splitlines() if "ssh -i" in line)
    ssh = shlex.split(hint[hint.index("ssh -i") :])
    assert "-p" in ssh and ssh[ssh.index("-p") + 1] == str(node.port), hint
    assert ssh[-1] == f"nobody@{node.host}", hint


def test_add_node_with_the_expected_fingerprint_pins_without_asking(
    keeper: Keeper, node: sshd.SshdNode, tmp_path: Path
) -> None:
    expected = fingerprint(node.host_key)
    run = keeper.run(*add_node_args("n2", node, tmp_path / "homes" / "n2", "--fingerprint", expected))
    assert run.rc == 0, run
    assert f"host key pinned: {expected} (matches --fingerprint)" in run.err
    assert node.host_public_key.split()[1] in (keeper.config_dir / "known_hosts").read_text()


def test_add_node_refuses_a_key_that_is_not_the_expected_fingerprint(
    keeper: Keeper, node: sshd.SshdNode, tmp_path: Path
) -> None:
    """An impostor (or a typo) at the address: nothing pinned, nothing recorded, even with --trust."""
    before = keeper.inventory.read_bytes()
    other = fingerprint(asyncssh.generate_private_key("ssh-ed25519"))
    for extra in ((), ("--trust",)):
        run = keeper.run(
            *add_node_args("n2", node, tmp_path / "homes" / "n2", "--fingerprint", other, *extra)
        )
        assert run.rc == 1, run
        assert "HOST_KEY_UNKNOWN" in run.err and f"not the expected {other}" in run.err
        assert fingerprint(node.host_key) in run.err
        assert not (keeper.config_dir / "known_hosts").exists()
        assert keeper.inventory.read_bytes() == before
    malformed = keeper.run(*add_node_args("n2", node, tmp_path / "homes" / "n2", "--fingerprint", "md5:ab"))
    assert malformed.rc == 1 and "INVALID_REQUEST" in malformed.err and "✓" not in malformed.err


def test_trust_says_it_pinned_the_key_as_offered(keeper: Keeper, node: sshd.SshdNode, tmp_path: Path) -> None:
    run = keeper.run(*add_node_args("n2", node, tmp_path / "homes" / "n2", "--trust"))
    assert run.rc == 0, run
    pinned = (
        f"host key pinned: {fingerprint(node.host_key)} (trusted as offered: compare it with the node's own)"
    )
    assert pinned in run.err
