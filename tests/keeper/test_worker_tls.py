"""Worker traffic that would leave the host is HTTPS, pinned to the hive's certificate read over SSH.

A real sshd node whose hive runs with `RBEE_HIVE_TLS=on` stands in for a node whose
workers listen on a LAN address; the keeper's `infer` and the queen's cold start must
both reach its workers over HTTPS, trusting that certificate and no other.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee_control.hive.tls import ensure_certificate
from rbee_control.queen.inventory_fleet import InventoryFleet
from tests import sshd
from tests.queen.conftest import serve_queen

from .conftest import HIVE_ENV, Keeper, make_keeper, stop_fleet

INFER = ("infer", "--node", "tls", "--model", "tiny", "--prompt", "hi", "--max-tokens", "3", "--raw")


@pytest.fixture(scope="module")
def tls_node(sshd_factory: sshd.SshdFactory) -> Iterator[sshd.SshdNode]:
    node = sshd_factory.start("127.0.0.6").set_env({**HIVE_ENV, "RBEE_HIVE_TLS": "on"})
    yield node
    node.stop()


def tls_keeper(tmp_path: Path, node: sshd.SshdNode, tiny_model: Path) -> tuple[Keeper, Path]:
    homes = tmp_path / "homes"
    inventory = sshd.write_inventory(
        tmp_path / "inventory.yaml", {"tls": node}, homes, local_node=None, venv=Path(sys.prefix)
    )
    keeper = make_keeper(tmp_path, inventory)
    sshd.trust_nodes(keeper.config_dir, [node])
    added = keeper.run("models", "add", f"file:{tiny_model}", "--node", "tls", "--name", "tiny")
    assert added.rc == 0, added
    return keeper, homes


def test_infer_pins_the_hive_certificate_and_trusts_no_other(
    tls_node: sshd.SshdNode, tiny_model: Path, tmp_path: Path
) -> None:
    keeper, homes = tls_keeper(tmp_path, tls_node, tiny_model)
    try:
        cold = keeper.run(*INFER)
        assert cold.rc == 0, cold
        assert "pinned the worker certificate of tls: SHA256:" in cold.err
        hive_cert = (homes / "tls" / "tls" / "cert.pem").read_text()
        (known,) = keeper.known_workers()
        assert known["url"].startswith("https://127.0.0.6:") and known["tls_certificate"] == hive_cert

        warm = keeper.run(*INFER, json_mode=True)
        assert warm.rc == 0, warm
        assert "connect" not in warm.json()["phases_s"], "a known https worker is reached without SSH"

        # a pin that is not the hive's certificate gets no trust: the check fails, the keeper asks the
        # hive over SSH again and pins the real certificate
        path = keeper.config_dir / "known_workers.json"
        state = json.loads(path.read_text())
        state["workers"][0]["tls_certificate"] = ensure_certificate(tmp_path / "other", ["127.0.0.6"]).pem
        path.write_text(json.dumps(state))
        again = keeper.run(*INFER, json_mode=True)
        assert again.rc == 0, again
        assert "connect" in again.json()["phases_s"]
        assert keeper.known_workers()[0]["tls_certificate"] == hive_cert
    finally:
        stop_fleet(keeper, homes)


async def test_the_queen_pins_it_for_a_cold_start(
    tls_node: sshd.SshdNode, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeper, homes = tls_keeper(tmp_path, tls_node, tiny_model)
    monkeypatch.setenv("RBEE_CONFIG_DIR", str(keeper.config_dir))  # the queen's known_hosts
    try:
        fleet = InventoryFleet.from_inventory(keeper.inventory)
        async with serve_queen(fleet) as queen:
            answer = await queen.openai().completions.create(model="tiny", prompt="hi", max_tokens=3)
            assert answer.choices[0].finish_reason in ("length", "stop")
            listed = keeper.run("worker", "list", "--node", "tls", json_mode=True)
            assert [w["url"][:8] for w in listed.json()["tls"]] == ["https://"]
    finally:
        stop_fleet(keeper, homes)
