"""Hostile input at the node: each attack against a real hive, refused, with nothing harmed.

Path-injected worker ids, plain-http and downgraded downloads, oversized bodies,
loose file modes from an older install, and secrets in the hive's environment.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rbee_control.hive.client import HiveClient
from rbee_control.hive.paths import HivePaths
from rbee_control.hive.tls import ensure_certificate
from rbee_worker.protocol.errors import RbeeError

from .conftest import Hive, cleanup, hive_env
from .servers import FileServer, serve_in_thread

PORTS = ("--port-min", "8750", "--port-max", "8799")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def catalog_names(hive: Hive) -> list[str]:
    db = hive.home / "models.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM models ORDER BY name")]


def socket_client(hive: Hive) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(hive.home / "hive.sock")), timeout=10)


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FileServer, Path]]:
    """The test file server again, over TLS with a self-signed certificate the hive is told to trust."""
    cert = ensure_certificate(tmp_path_factory.mktemp("tls"), ["127.0.0.1"])
    server = FileServer()
    with serve_in_thread(server.app(), tls=(cert.cert, cert.key)) as url:
        server.url = url
        yield server, cert.cert


# --- worker ids ------------------------------------------------------------------------


async def test_a_path_injected_worker_id_never_reaches_the_hive_api(hive: Hive, tiny_model: Path) -> None:
    hive.ok("models", "add", f"file:{tiny_model}", "--name", "tiny")
    hive.start(*PORTS)
    try:
        for bad in ("../admin/shutdown?", "..", "worker-1/../../x", "a b", "-rf", "x" * 65):
            if not bad.startswith("-"):  # an option-like id is a usage error (exit 2) before anything runs
                err = hive.run("worker", "stop", bad).error
                assert err["code"] == "INVALID_REQUEST" and "invalid worker id" in err["message"], bad
            with pytest.raises(RbeeError) as info:  # the client refuses before building a URL
                async with HiveClient(HivePaths(hive.home)) as client:
                    await client.stop_worker(bad)
            assert info.value.code == "INVALID_REQUEST"
        with socket_client(hive) as raw:  # and the API itself, for whoever talks to the socket directly
            refused = raw.post("http://hive/v1/workers/a%20b%3F/stop")
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "INVALID_REQUEST"
            assert raw.get("http://hive/v1/health").json()["status"] == "alive"
        status = hive.run("status").result
        assert status["running"] is True, "the hive was not shut down by a worker id"
        assert hive.run("worker", "stop", "worker-00000000").error["code"] == "WORKER_NOT_FOUND"
    finally:
        cleanup(hive)


# --- downloads -------------------------------------------------------------------------


def test_plain_http_needs_a_sha256(hive: Hive, file_server: FileServer, tiny_model: Path) -> None:
    url = file_server.add("cleartext.gguf", tiny_model)
    err = hive.run("models", "add", url).error
    assert err["code"] == "INVALID_REQUEST" and "--sha256" in err["hint"]
    assert file_server.requests_for("cleartext.gguf") == [], "refused before any request"
    assert hive.model_files() == [] and catalog_names(hive) == []
    assert hive.run("models", "add", url, "--sha256", sha256(tiny_model)).result["name"] == "cleartext"


def test_an_https_to_http_redirect_is_refused(
    hive: Hive, file_server: FileServer, https_server: tuple[FileServer, Path], tiny_model: Path
) -> None:
    secure, cert = https_server
    hive.env["SSL_CERT_FILE"] = str(cert)
    file_server.add("downgrade.gguf", tiny_model)
    secure.redirects["downgrade.gguf"] = f"{file_server.url}/files/downgrade.gguf"
    err = hive.run("models", "add", f"{secure.url}/redirect/downgrade.gguf").error
    assert err["code"] == "DOWNLOAD_FAILED" and "refusing a redirect from https to http" in err["message"]
    assert file_server.requests_for("downgrade.gguf") == [], "the http URL was never requested"
    assert hive.model_files() == [] and catalog_names(hive) == []

    # https all the way (a redirect included) needs no --sha256
    secure.add("upgrade.gguf", tiny_model)
    secure.redirects["upgrade.gguf"] = f"{secure.url}/files/upgrade.gguf"
    row = hive.run("models", "add", f"{secure.url}/redirect/upgrade.gguf", "--name", "secure").result
    assert row["sha256"] == sha256(tiny_model) and catalog_names(hive) == ["secure"]


def test_a_declared_size_over_the_cap_is_refused_before_writing(
    hive: Hive, file_server: FileServer, tiny_model: Path
) -> None:
    size = tiny_model.stat().st_size
    url = file_server.add("huge.gguf", tiny_model)
    digest = ("--sha256", sha256(tiny_model))
    err = hive.run("models", "add", url, *digest, "--max-bytes", str(size - 1)).error
    assert err["code"] == "DOWNLOAD_FAILED" and err["details"] == {
        "url": url,
        "size": size,
        "max_bytes": size - 1,
    }
    assert "--max-bytes" in err["hint"]
    assert hive.model_files() == [] and catalog_names(hive) == []
    hive.env["RBEE_HIVE_MAX_MODEL_BYTES"] = str(size - 1)  # the node's own default, from its environment
    assert hive.run("models", "add", url, *digest).error["details"]["max_bytes"] == size - 1
    del hive.env["RBEE_HIVE_MAX_MODEL_BYTES"]
    assert hive.run("models", "add", url, *digest, "--max-bytes", str(size)).result["size"] == size


def test_a_body_running_past_the_cap_is_cut_and_deleted(
    hive: Hive, file_server: FileServer, tiny_model: Path
) -> None:
    """No Content-Length (chunked): only the byte count can tell; the partial file must not survive."""
    cap = tiny_model.stat().st_size // 3
    url = file_server.add("endless.gguf", tiny_model, chunked=True)
    err = hive.run("models", "add", url, "--sha256", sha256(tiny_model), "--max-bytes", str(cap)).error
    assert err["code"] == "DOWNLOAD_FAILED" and "partial file deleted" in err["message"]
    assert err["details"] == {"url": url, "limit": cap, "declared": False}
    assert hive.model_files() == [] and catalog_names(hive) == []
    gets = [s for s in file_server.requests_for("endless.gguf") if s.method == "GET"]
    assert len(gets) == 1, "an oversized body is not retried"


# --- state on disk ---------------------------------------------------------------------


def test_an_old_loose_home_is_tightened(hive: Hive, tiny_model: Path) -> None:
    """A home and catalog made world-readable (an older version, a hand-made directory) get 0700/0600."""
    hive.home.mkdir(mode=0o755)
    os.chmod(hive.home, 0o755)
    (hive.home / "models").mkdir(mode=0o755)
    os.chmod(hive.home / "models", 0o755)
    sqlite3.connect(hive.home / "models.db").close()
    os.chmod(hive.home / "models.db", 0o644)
    hive.ok("models", "add", f"file:{tiny_model}", "--name", "tiny")
    for path, mode in ((hive.home, 0o700), (hive.home / "models", 0o700), (hive.home / "models.db", 0o600)):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    for extra in hive.home.glob("models.db-*"):
        assert stat.S_IMODE(extra.stat().st_mode) == 0o600, extra
    assert catalog_names(hive) == ["tiny"]


def test_a_fresh_catalog_is_private(hive: Hive) -> None:
    hive.ok("models", "list")
    assert stat.S_IMODE(hive.home.stat().st_mode) == 0o700
    assert stat.S_IMODE((hive.home / "models.db").stat().st_mode) == 0o600


def test_models_dir_puts_model_files_elsewhere(hive: Hive, tiny_model: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "big-disk" / "models"
    hive.env["RBEE_MODELS_DIR"] = str(elsewhere)
    row = hive.ok("models", "add", f"file:{tiny_model}", "--name", "tiny")
    assert Path(row["path"]) == elsewhere / "tiny.gguf" and sha256(elsewhere / "tiny.gguf") == sha256(
        tiny_model
    )
    assert not (hive.home / "models" / "tiny.gguf").exists()
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o700
    by_option = hive.run(
        "models", "add", f"file:{tiny_model}", "--name", "t2", "--models-dir", str(tmp_path / "o")
    )
    assert Path(by_option.result["path"]) == tmp_path / "o" / "t2.gguf"


# --- the worker's environment ----------------------------------------------------------


SECRETS = {
    "HF_TOKEN": "hf_secret_token_value",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
    "RBEE_QUEEN_ADMIN_KEY": "queen-admin-secret",
    "GITHUB_TOKEN": "gh-secret",
}


def test_workers_get_a_scrubbed_environment_and_keys_stay_out_of_logs(
    tmp_path: Path, file_server: FileServer, tiny_model: Path
) -> None:
    hive = Hive(tmp_path / "home", {**hive_env(tmp_path, file_server), **SECRETS, "OMP_NUM_THREADS": "1"})
    hive.ok("models", "add", f"file:{tiny_model}", "--name", "tiny")
    hive.start(*PORTS)
    try:
        worker = hive.run("worker", "spawn", "--model", "tiny", "--ctx", "1024", "--wait").result
        environ = Path(f"/proc/{worker['pid']}/environ").read_bytes().split(b"\0")
        names = {e.split(b"=", 1)[0].decode() for e in environ if e}
        assert not names & set(SECRETS), names & set(SECRETS)
        assert {"PATH", "RBEE_WORKER_API_KEY", "OMP_NUM_THREADS"} <= names
        assert not {n for n in names if n.startswith(("HF_", "SSH_"))}, names
        headers = {"Authorization": f"Bearer {worker['api_key']}"}
        body = {"prompt": "a bee", "max_tokens": 3}
        answer = httpx.post(f"{worker['url']}/v1/inference", json=body, headers=headers, timeout=30)
        assert answer.status_code == 200 and b"event: end" in answer.content, "the worker still serves"
        hive.ok("worker", "stop", worker["id"])
        for log in (hive.home / "logs").iterdir():
            assert worker["api_key"] not in log.read_text(errors="replace"), log
    finally:
        cleanup(hive)
