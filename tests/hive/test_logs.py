"""Log files: size-capped rotation, the last lines of a big file, and following across a rotation."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from rbee_control.hive.logs import follow, last_lines, log_file
from rbee_control.hive.paths import HivePaths
from rbee_worker.logfile import rotating_handler
from rbee_worker.protocol.errors import RbeeError


def test_rotation_caps_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_LOG_MAX_BYTES", "2000")
    monkeypatch.setenv("RBEE_LOG_BACKUPS", "2")
    logger = logging.getLogger("rbee.test-rotation")
    handler = rotating_handler(tmp_path / "hive.log")
    logger.addHandler(handler)
    try:
        for i in range(200):
            logger.warning("line %d %s", i, "x" * 40)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hive.log", "hive.log.1", "hive.log.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    assert last_lines(tmp_path / "hive.log", 1).decode().strip().endswith("x" * 40)
    assert b"line 199 " in last_lines(tmp_path / "hive.log", 3)


def test_last_lines_of_a_large_file(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    path.write_bytes(b"".join(b"%d\n" % i for i in range(100_000)))
    assert last_lines(path, 3) == b"99997\n99998\n99999\n"
    assert last_lines(path, 0) == b""


def test_follow_sees_appends_and_the_file_after_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    path.write_text("old\n")
    seen: list[bytes] = []
    got_all, got_first = threading.Event(), threading.Event()

    def write(data: bytes) -> None:
        seen.append(data)
        got_first.set()
        if b"after rotation" in b"".join(seen):
            got_all.set()

    reader = threading.Thread(target=follow, args=(path, write, got_all.is_set, 4), daemon=True)
    with path.open("a") as f:
        f.write("new line\n")
    reader.start()
    assert got_first.wait(30), "the appended line was not seen"
    path.rename(tmp_path / "w.log.1")
    path.write_text("after rotation\n")
    reader.join(30)
    assert not reader.is_alive() and b"".join(seen) == b"new line\nafter rotation\n"


def test_log_file_checks_the_worker_id(tmp_path: Path) -> None:
    paths = HivePaths(tmp_path).ensure()
    with pytest.raises(RbeeError) as bad:
        log_file(paths, "../hive")
    assert bad.value.code == "INVALID_REQUEST"
    with pytest.raises(RbeeError) as missing:
        log_file(paths, None)
    assert missing.value.code == "NOT_FOUND"
