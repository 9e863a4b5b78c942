"""`rbee-hive models ...`: real downloads from a local server and a fake HF hub, real files, real SQLite."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from .conftest import Hive
from .servers import FileServer


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def catalog_names(hive: Hive) -> list[str]:
    with sqlite3.connect(hive.home / "models.db") as db:
        return [r[0] for r in db.execute("SELECT name FROM models ORDER BY name")]


def test_add_from_file_then_cached_list_verify_rm(hive: Hive, model_copy: Path) -> None:
    run = hive.run("models", "add", f"file:{model_copy}")
    row = run.result
    assert row["name"] == "tiny-copy" and row["cached"] is False
    assert row["architecture"] == "llama" and row["sha256"] == sha256(model_copy)
    assert Path(row["path"]) == hive.home / "models" / "tiny-copy.gguf"
    assert any(e.event == "progress" and e.data["phase"] == "verify" for e in run.events)

    again = hive.run("models", "add", f"file://{model_copy}")
    assert again.result["cached"] is True and again.result["added_at"] == row["added_at"]
    assert not any(e.event == "progress" for e in again.events), "a cached model is not fetched again"

    listed = hive.run("models", "list").result["models"]
    assert [m["name"] for m in listed] == ["tiny-copy"] and "chat_template" not in listed[0]
    assert hive.run("models", "verify", "tiny-copy").result["ok"] is True
    removed = hive.run("models", "rm", "tiny-copy").result
    assert removed["freed_bytes"] == row["size"]
    assert model_copy.exists(), "removing the catalogued link must not touch the operator's file"
    assert hive.model_files() == [] and catalog_names(hive) == []
    assert hive.run("models", "rm", "tiny-copy").error["code"] == "MODEL_NOT_FOUND"


def test_http_download_resumes_after_a_dropped_connection(
    hive: Hive, file_server: FileServer, tiny_model: Path
) -> None:
    url = file_server.add("drop.gguf", tiny_model, drop_first=1)
    run = hive.run("models", "add", url, "--name", "dropped", "--sha256", sha256(tiny_model))
    assert run.result["sha256"] == sha256(tiny_model)
    gets = [s for s in file_server.requests_for("drop.gguf") if s.method == "GET"]
    assert len(gets) == 2 and gets[0].range is None
    assert gets[1].range is not None and int(gets[1].range.removeprefix("bytes=").rstrip("-")) > 0
    logs = [e.data["message"] for e in run.events if e.event == "log"]
    assert any("retrying download (attempt 2/6)" in m for m in logs) and any(
        "resuming at byte" in m for m in logs
    )
    assert sha256(hive.home / "models" / "dropped.gguf") == sha256(tiny_model)
    assert hive.model_files() == ["dropped.gguf"]


def test_sha256_mismatch_is_refused_and_leaves_nothing(
    hive: Hive, file_server: FileServer, tiny_model: Path
) -> None:
    url = file_server.add("plain.gguf", tiny_model)
    err = hive.run("models", "add", url, "--sha256", "0" * 64).error
    assert err["code"] == "CHECKSUM_MISMATCH" and err["details"]["actual"] == sha256(tiny_model)
    assert hive.model_files() == [] and catalog_names(hive) == []


def test_corrupt_and_truncated_files_are_refused(
    hive: Hive, file_server: FileServer, tiny_model: Path, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096))
    assert hive.run("models", "add", f"file:{garbage}").error["code"] == "INVALID_MODEL_FILE"
    half = tmp_path / "half.gguf"
    half.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])
    err = hive.run("models", "add", file_server.add("half.gguf", half), "--sha256", sha256(half)).error
    assert err["code"] == "INVALID_MODEL_FILE" and "truncated" in err["message"]
    assert hive.model_files() == [] and catalog_names(hive) == []
    assert garbage.exists(), "a refused import deletes our copy, not the operator's file"


def test_fake_hf_hub(hive: Hive, file_server: FileServer, tiny_model: Path) -> None:
    file_server.add("rbee-tiny.Q8.gguf", tiny_model)
    file_server.repos["rbee/tiny-GGUF"] = ["rbee-tiny.Q8.gguf"]
    run = hive.run("models", "add", "hf:rbee/tiny-GGUF")  # one .gguf in the listing: picked
    row = run.result
    assert row["name"] == "rbee-tiny.Q8" and row["sha256"] == sha256(tiny_model)
    assert [s.method for s in file_server.requests_for("rbee-tiny.Q8.gguf")] == ["HEAD", "GET"]
    assert hive.run("models", "add", "hf:rbee/tiny-GGUF").result["cached"] is True

    file_server.add("liar.gguf", tiny_model, fake_sha256="ab" * 32)
    file_server.repos["rbee/liar-GGUF"] = ["liar.gguf"]
    err = hive.run("models", "add", "hf:rbee/liar-GGUF:liar.gguf").error
    assert err["code"] == "CHECKSUM_MISMATCH" and err["details"]["expected"] == "ab" * 32
    missing = hive.run("models", "add", "hf:nobody/nothing:x.gguf").error
    assert missing["code"] == "MODEL_NOT_FOUND" and "hint" in missing
    assert catalog_names(hive) == ["rbee-tiny.Q8"]


def test_retries_then_gives_up_with_download_failed(
    hive: Hive, file_server: FileServer, tiny_model: Path
) -> None:
    digest = ("--sha256", sha256(tiny_model))  # plain http needs one
    flaky = file_server.add("flaky.gguf", tiny_model, fail_first=3)
    assert hive.run("models", "add", flaky, *digest).result["name"] == "flaky"
    broken = file_server.add("broken.gguf", tiny_model, fail_first=10**6)
    err = hive.run("models", "add", broken, *digest).error
    assert err["code"] == "DOWNLOAD_FAILED" and err["details"]["attempts"] == 6
    assert "HTTP 500" in err["details"]["last_error"]
    assert len(file_server.requests_for("broken.gguf")) == 6
    nowhere = hive.run("models", "add", f"{file_server.url}/files/absent.gguf", *digest).error
    assert nowhere["code"] == "MODEL_NOT_FOUND"
    assert catalog_names(hive) == ["flaky"]


def test_bad_input_is_refused_before_any_work(hive: Hive, model_copy: Path) -> None:
    for args in (
        ["file:relative/x.gguf"],
        ["ftp://x/y.gguf"],
        ["hf:justaname"],
        [f"file:{model_copy}", "--name", "../x"],
    ):
        assert hive.run("models", "add", *args).error["code"] == "INVALID_REQUEST", args
    assert hive.run("models", "add", f"file:{model_copy}.missing").error["code"] == "MODEL_NOT_FOUND"
    assert hive.run("models", "frobnicate").rc == 2
    assert catalog_names(hive) == []


def test_catalog_survives_a_daemon_restart(hive: Hive, model_copy: Path) -> None:
    hive.run("models", "add", f"file:{model_copy}", "--name", "keeper")
    hive.start()
    assert [m["name"] for m in hive.run("models", "list").result["models"]] == ["keeper"]
    hive.stop()
    status = hive.run("status").result
    assert not status["running"] and status["node"]["models"] == 1
    assert [m["name"] for m in hive.run("models", "list").result["models"]] == ["keeper"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A 300 KB tmpfs: smaller than the tiny model. Needs root (mount)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_keeps_the_part_file_and_resumes(
    small_disk: Path, file_server: FileServer, tiny_model: Path
) -> None:
    hive = Hive(small_disk / "home", {**os.environ, "RBEE_HIVE_DOWNLOAD_BACKOFF": "0.01"})
    url = file_server.add("big.gguf", tiny_model, chunked=True)  # no length: only ENOSPC can tell
    digest = ("--sha256", sha256(tiny_model))
    err = hive.run("models", "add", url, *digest).error
    assert err["code"] == "DISK_FULL" and "hint" in err
    part = small_disk / "home" / "models" / "big.gguf.part"
    kept = part.stat().st_size
    assert 0 < kept < tiny_model.stat().st_size
    subprocess.run(["mount", "-o", "remount,size=2m", str(small_disk)], check=True)
    assert hive.run("models", "add", url, *digest).result["sha256"] == sha256(tiny_model)
    assert file_server.requests_for("big.gguf")[-1].range == f"bytes={kept}-"
    assert hive.model_files() == ["big.gguf"]
