"""ctransformers' build is chosen from the kernel's CPU flags, by the rule ctransformers itself uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee_worker.runtimes.ctransformers_runtime import cpu_library


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse2 avx f16c avx2 fma", "avx2"),
        ("fpu sse2 avx f16c", "avx"),
        ("fpu sse2 avx", "basic"),
        ("fpu sse2", "basic"),
    ],
)
def test_the_flags_line_decides(tmp_path: Path, flags: str, expected: str) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_library(str(info)) == expected


def test_no_flags_line_or_no_file_leaves_it_to_ctransformers(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert cpu_library(str(info)) is None
    assert cpu_library(str(tmp_path / "missing")) is None


def test_this_machine_agrees_with_py_cpuinfo() -> None:
    cpuinfo = pytest.importorskip("cpuinfo")
    flags = cpuinfo.get_cpu_info().get("flags", [])
    expected = "avx2" if "avx2" in flags else "avx" if "avx" in flags and "f16c" in flags else "basic"
    assert cpu_library() == expected
