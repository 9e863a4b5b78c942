"""Secrets beside the inventory: 0600, stable, and refused when others could read them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rbee_control.inventory.paths import config_dir, known_hosts_path
from rbee_control.inventory.secrets import SecretStore, secrets_path_for
from rbee_worker.protocol.errors import ErrorCode, RbeeError


def test_tokens_are_created_once_with_mode_0600(tmp_path: Path) -> None:
    store = SecretStore.beside(tmp_path / "inventory.yaml")
    assert store.path == tmp_path / "inventory.secrets.json"
    assert store.token("mac") is None
    token = store.get_or_create_token("mac")
    assert len(token) >= 40
    assert store.path.stat().st_mode & 0o777 == 0o600
    assert SecretStore(store.path).get_or_create_token("mac") == token
    assert store.get_or_create_token("gpu") != token
    key = store.get_or_create_queen_key()
    assert store.queen_key() == key and key not in (token,)
    data = json.loads(store.path.read_text())
    assert data["node_tokens"] == {"mac": token, "gpu": store.token("gpu")}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_forget_node(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "s.json")
    store.get_or_create_token("mac")
    assert store.forget_node("mac") is True
    assert store.forget_node("mac") is False
    assert store.token("mac") is None


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_readable_by_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    store = SecretStore(secrets_path_for(tmp_path / "inventory.yaml"))
    store.get_or_create_token("mac")
    store.path.chmod(mode)
    before = store.path.read_bytes()
    with pytest.raises(RbeeError) as info:
        store.get_or_create_token("mac")
    assert info.value.code == ErrorCode.INVENTORY_INVALID
    assert f"mode {mode:04o}" in info.value.message
    assert info.value.hint == f"chmod 600 {store.path}"
    assert store.path.read_bytes() == before


def test_corrupt_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text("{not json")
    path.chmod(0o600)
    with pytest.raises(RbeeError, match="not valid JSON"):
        SecretStore(path).token("mac")


def test_config_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_CONFIG_DIR", str(tmp_path / "cfg"))
    assert config_dir() == tmp_path / "cfg"
    assert known_hosts_path() == tmp_path / "cfg" / "known_hosts"
    monkeypatch.delenv("RBEE_CONFIG_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert known_hosts_path() == tmp_path / "xdg" / "rbee" / "known_hosts"
