"""The keeper against hostile input on real nodes (local and sshd): each refused, nothing harmed.

A path-injected worker id, `file:` refs that decode differently twice, a tampered
partial upload on the node, a file that is not the sha256 the operator expects,
and the inventory's `models_dir`.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from rbee_worker.tinymodel import write_tiny_model
from tests import sshd

from .conftest import Fleet, make_keeper, stop_fleet


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def catalog(fleet: Fleet, node: str) -> dict[str, dict]:
    run = fleet.keeper.run("models", "list", "--node", node, json_mode=True)
    assert run.rc == 0, run
    return {m["name"]: m for m in run.json()[node]}


def test_a_path_injected_worker_id_is_refused_and_the_hives_keep_running(fleet: Fleet) -> None:
    keeper = fleet.keeper
    for node in ("local", "n2"):
        assert keeper.run("hive", "start", "--node", node).rc == 0
    for node in ("local", "n2"):
        for bad in ("../admin/shutdown?", "../../v1/admin/shutdown", "w;reboot"):
            run = keeper.run("worker", "stop", bad, "--node", node)
            assert run.rc == 1 and "INVALID_REQUEST" in run.err and "invalid worker id" in run.err, run
            assert "✓" not in run.err and "Traceback" not in run.err
    status = keeper.run("status", json_mode=True)
    assert status.json()["local"]["running"] is True and status.json()["n2"]["running"] is True


def test_file_refs_are_percent_decoded_exactly_once(fleet: Fleet, tmp_path: Path) -> None:
    """`a%2541.gguf` names the file `a%41.gguf`; decoding twice would catalogue `aA.gguf` instead."""
    literal = write_tiny_model(tmp_path / "a%41.gguf", seed=11)
    decoded = write_tiny_model(tmp_path / "aA.gguf", seed=12)
    assert sha256(literal) != sha256(decoded)
    for node in ("local", "n2"):
        pct = fleet.keeper.run(
            "models",
            "add",
            f"file:{tmp_path}/a%2541.gguf",
            "--node",
            node,
            "--name",
            f"pct-{node}",
            json_mode=True,
        )
        assert pct.rc == 0, pct
        assert pct.json()["sha256"] == sha256(literal), (
            "the file the operator named, not its twice-decoded twin"
        )
        plain = fleet.keeper.run(
            "models",
            "add",
            f"file:{tmp_path}/a%41.gguf",
            "--node",
            node,
            "--name",
            f"dec-{node}",
            json_mode=True,
        )
        assert plain.rc == 0 and plain.json()["sha256"] == sha256(decoded), plain
        for name in (f"pct-{node}", f"dec-{node}"):
            assert fleet.keeper.run("models", "rm", name, "--node", node).rc == 0


def test_a_tampered_partial_upload_is_not_trusted(fleet: Fleet, tmp_path: Path) -> None:
    """A partial copy on the node with the right size but other bytes: the resume is caught and redone."""
    source = write_tiny_model(tmp_path / "resumable.gguf", seed=13)
    data = source.read_bytes()
    incoming = fleet.homes / "n2" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    (incoming / "tampered.gguf").write_bytes(bytes(b ^ 0xFF for b in data[: len(data) // 2]))

    run = fleet.keeper.run("models", "add", f"file:{source}", "--node", "n2", "--name", "tampered")
    assert run.rc == 0, run
    assert "the resumed copy of resumable.gguf differs; pushing it again from the start" in run.err
    entry = catalog(fleet, "n2")["tampered"]
    assert entry["sha256"] == sha256(source) and Path(entry["path"]).read_bytes() == data
    assert not (incoming / "tampered.gguf").exists(), "the pushed copy is moved into the catalog"

    # a correct partial copy still resumes, without a second push
    (incoming / "honest.gguf").write_bytes(data[: len(data) // 2])
    honest = fleet.keeper.run("models", "add", f"file:{source}", "--node", "n2", "--name", "honest")
    assert honest.rc == 0 and "pushing it again" not in honest.err, honest
    assert catalog(fleet, "n2")["honest"]["sha256"] == sha256(source)
    for name in ("tampered", "honest"):
        assert fleet.keeper.run("models", "rm", name, "--node", "n2").rc == 0


def test_a_pushed_file_that_is_not_the_expected_sha256_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    source = write_tiny_model(tmp_path / "unexpected.gguf", seed=14)
    run = fleet.keeper.run(
        "models", "add", f"file:{source}", "--node", "n2", "--name", "unexpected", "--sha256", "0" * 64
    )
    assert run.rc == 1 and "CHECKSUM_MISMATCH" in run.err and sha256(source) in run.err, run
    assert "unexpected" not in catalog(fleet, "n2")


@pytest.mark.llama
def test_the_inventorys_models_dir_holds_the_model_files(
    keeper_sshd_nodes: list[sshd.SshdNode], tiny_model: Path, tmp_path: Path
) -> None:
    node = keeper_sshd_nodes[0]
    homes = tmp_path / "homes"
    inventory = sshd.write_inventory(
        tmp_path / "inventory.yaml", {"n2": node}, homes, local_node=None, venv=Path(sys.prefix)
    )
    models_dir = tmp_path / "big-disk" / "rbee-models"
    text = inventory.read_text().replace(
        f"    home: '{homes / 'n2'}'", f"    home: '{homes / 'n2'}'\n    models_dir: '{models_dir}'"
    )
    inventory.write_text(text)
    keeper = make_keeper(tmp_path, inventory)
    sshd.trust_nodes(keeper.config_dir, [node])
    try:
        run = keeper.run("infer", "--node", "n2", "--model", f"file:{tiny_model}", "--name", "tiny",
                         "--prompt", "hi", "--max-tokens", "3", "--raw", json_mode=True)  # fmt: skip
        assert run.rc == 0, run
        assert (models_dir / "tiny.gguf").read_bytes() == tiny_model.read_bytes()
        assert not (homes / "n2" / "models" / "tiny.gguf").exists()
        listed = keeper.run("models", "list", "--node", "n2", json_mode=True).json()["n2"]
        assert [Path(m["path"]) for m in listed] == [models_dir / "tiny.gguf"]
    finally:
        stop_fleet(keeper, homes)
