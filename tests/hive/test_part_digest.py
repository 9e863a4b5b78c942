"""The running sha256 of a `.part` file equals hashing the file, however the bytes got there."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from rbee_control.hive.part_file import PartDigest

DATA = os.urandom(3 * (1 << 20) + 12345)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_bytes_followed_as_written(tmp_path: Path) -> None:
    part = tmp_path / "m.gguf.part"
    digest = PartDigest(part)
    await digest.start_at(0)
    with part.open("wb") as f:
        for i in range(0, len(DATA), 65536):
            f.write(DATA[i : i + 65536])
            digest.update(DATA[i : i + 65536])
    assert await digest.hexdigest() == _sha(DATA)


async def test_resume_from_a_file_another_process_left(tmp_path: Path) -> None:
    part = tmp_path / "m.gguf.part"
    cut = 1_500_000
    part.write_bytes(DATA[:cut])
    digest = PartDigest(part)
    await digest.start_at(cut)
    with part.open("ab") as f:
        f.write(DATA[cut:])
        digest.update(DATA[cut:])
    assert await digest.hexdigest() == _sha(DATA)


async def test_restart_from_zero_and_a_write_it_did_not_see(tmp_path: Path) -> None:
    part = tmp_path / "m.gguf.part"
    digest = PartDigest(part)
    await digest.start_at(0)
    part.write_bytes(b"old version")
    digest.update(b"old version")
    await digest.start_at(0)  # the server could not resume: start over
    part.write_bytes(DATA[:1000])
    digest.update(DATA[:1000])
    with part.open("ab") as f:  # a partial write whose bytes never reached the hash
        f.write(DATA[1000:5000])
    assert await digest.hexdigest() == _sha(DATA[:5000])
