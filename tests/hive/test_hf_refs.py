"""`hf:` refs the way operators type them: a repo, a quantization tag, a path, a split set."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rbee_control.hive.hf_files import Quant, RepoFile, choose, group, quant_tag
from rbee_control.hive.refs import parse_ref
from rbee_worker.protocol.errors import RbeeError
from rbee_worker.tinymodel import write_tiny_model

from .conftest import Hive
from .servers import FileServer

TINYLLAMA = "rbee/TinyLlama-1.1B-Chat-v1.0-GGUF"
QUANTS = ("Q2_K", "Q4_K_M", "Q8_0")


def listing(*names: str, sizes: dict[str, int] | None = None) -> list[Quant]:
    return group(RepoFile(n, (sizes or {}).get(n)) for n in names)


def test_quant_tags_are_read_from_file_names() -> None:
    assert quant_tag("tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf") == "Q4_K_M"
    assert quant_tag("Q8_0/Model-q8_0-00001-of-00002.gguf") == "Q8_0"
    assert quant_tag("model-IQ4_XS.gguf") == "IQ4_XS" and quant_tag("model-f16.gguf") == "F16"
    assert quant_tag("model.gguf") is None


def test_default_is_q4_k_m_then_closest_4bit_then_smallest() -> None:
    names = [f"tinyllama.{q}.gguf" for q in QUANTS]
    pick, why = choose(listing(*names), "hf:x/y")
    assert pick.tag == "Q4_K_M" and "default" in why
    pick, why = choose(listing("m.Q8_0.gguf", "m.Q4_0.gguf", "m.Q5_K_M.gguf"), "hf:x/y")
    assert pick.tag == "Q4_0" and "closest 4-bit" in why
    sizes = {"m.Q8_0.gguf": 800, "m.Q6_K.gguf": 600, "m.F16.gguf": 1600}
    pick, why = choose(listing(*sizes, sizes=sizes), "hf:x/y")
    assert pick.tag == "Q6_K" and "smallest" in why


def test_tags_are_case_insensitive_and_bad_tags_list_the_repo() -> None:
    quants = listing(*(f"tinyllama.{q}.gguf" for q in QUANTS))
    assert choose(quants, "hf:x/y:q8_0", "q8_0")[0].primary == "tinyllama.Q8_0.gguf"
    with pytest.raises(RbeeError) as absent:
        choose(quants, "hf:x/y:Q5_K_M", "Q5_K_M")
    assert absent.value.code == "MODEL_NOT_FOUND"
    assert [f["tag"] for f in absent.value.details["gguf_files"]] == ["Q2_K", "Q4_K_M", "Q8_0"]
    assert "Q4_K_M (tinyllama.Q4_K_M.gguf)" in absent.value.message
    twice = listing("a.Q8_0.gguf", "b.Q8_0.gguf")
    with pytest.raises(RbeeError) as ambiguous:
        choose(twice, "hf:x/y:Q8_0", "Q8_0")
    assert ambiguous.value.code == "INVALID_REQUEST" and len(ambiguous.value.details["gguf_files"]) == 2
    with pytest.raises(RbeeError) as unsized:
        choose(listing("a.gguf", "b.gguf"), "hf:x/y")
    assert unsized.value.details["gguf_files"][0]["files"] == ["a.gguf"]
    with pytest.raises(RbeeError) as empty:
        choose([], "hf:x/y")
    assert empty.value.code == "MODEL_NOT_FOUND"


def test_split_sets_group_and_incomplete_ones_are_left_out() -> None:
    quants = listing(
        "big-Q8_0-00002-of-00002.gguf",
        "big-Q8_0-00001-of-00002.gguf",
        "half-Q4_0-00001-of-00002.gguf",
        "mmproj-f16.gguf",
        "README.md",
    )
    assert [(q.tag, [f.path for f in q.files]) for q in quants] == [
        ("Q8_0", ["big-Q8_0-00001-of-00002.gguf", "big-Q8_0-00002-of-00002.gguf"])
    ]
    assert quants[0].base == "big-Q8_0" and quants[0].split


def test_ref_forms_parse_without_the_network() -> None:
    tag = parse_ref("hf:o/r:q4_k_m")
    assert (tag.location, tag.tag, tag.filename) == ("o/r", "Q4_K_M", None)
    path = parse_ref("hf:o/r/sub/m.Q8_0.gguf")
    assert (path.raw, path.filename) == ("hf:o/r:sub/m.Q8_0.gguf", "sub/m.Q8_0.gguf")
    assert parse_ref("hf:o/r@main:m.gguf").revision == "main"
    assert parse_ref("hf:o/r/m-00001-of-00003.gguf").split
    assert parse_ref("hf:o/r/m-00001-of-00003.gguf").default_name == "m"
    for bad in ("hf:o/r:", "hf:o/r:a:b", "hf:o/r/x.bin"):
        with pytest.raises(RbeeError):
            parse_ref(bad)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hub_repos(tmp_path_factory: pytest.TempPathFactory, file_server: FileServer) -> dict[str, Path]:
    """A TinyLlama-style repo (three quantizations, three files), a split model, a repo without GGUF."""
    d = tmp_path_factory.mktemp("hub")
    files = {}
    for seed, q in enumerate(QUANTS):
        name = f"tinyllama-1.1b-chat-v1.0.{q}.gguf"
        files[q] = write_tiny_model(d / name, seed=seed)
        file_server.add(name, files[q])
    file_server.repos[TINYLLAMA] = [f"tinyllama-1.1b-chat-v1.0.{q}.gguf" for q in QUANTS]
    (d / "split").mkdir()
    first = write_tiny_model(d / "split" / "tiny-split-Q8_0.gguf", seed=7, split_max_tensors=8)
    parts = sorted(first.parent.glob("tiny-split-Q8_0-*.gguf"))
    for p in parts:
        file_server.add(p.name, p)
    file_server.repos["rbee/split-GGUF"] = [p.name for p in parts]
    file_server.repos["rbee/safetensors-only"] = ["model.safetensors"]
    return {**files, **{f"part{i + 1}": p for i, p in enumerate(parts)}}


def logs(run: object) -> list[str]:
    return [e.data["message"] for e in run.events if e.event == "log"]  # type: ignore[attr-defined]


def test_every_hf_form_against_a_fake_hub(hive: Hive, hub_repos: dict[str, Path]) -> None:
    run = hive.run("models", "add", f"hf:{TINYLLAMA}")
    assert run.result["sha256"] == sha256(hub_repos["Q4_K_M"]), "Q4_K_M is the default"
    assert any("tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf" in m and "default" in m for m in logs(run))
    q8 = hive.run("models", "add", f"hf:{TINYLLAMA}:q8_0").result
    assert q8["sha256"] == sha256(hub_repos["Q8_0"]) and q8["name"] == "tinyllama-1.1b-chat-v1.0.Q8_0"
    q2 = hive.run("models", "add", f"hf:{TINYLLAMA}/tinyllama-1.1b-chat-v1.0.Q2_K.gguf").result
    assert q2["sha256"] == sha256(hub_repos["Q2_K"])
    again = hive.run("models", "add", f"hf:{TINYLLAMA}:tinyllama-1.1b-chat-v1.0.Q2_K.gguf").result
    assert again["cached"] is True, "the path and the colon spelling are one ref"

    absent = hive.run("models", "add", f"hf:{TINYLLAMA}:Q5_K_M").error
    assert absent["code"] == "MODEL_NOT_FOUND" and "models search" in absent["hint"]
    assert [f["tag"] for f in absent["details"]["gguf_files"]] == list(QUANTS)
    none = hive.run("models", "add", "hf:rbee/safetensors-only").error
    assert none["code"] == "MODEL_NOT_FOUND" and "no .gguf" in none["message"]
    assert sorted(m["name"] for m in hive.run("models", "list").result["models"]) == [
        f"tinyllama-1.1b-chat-v1.0.{q}" for q in QUANTS
    ]


def test_a_split_model_downloads_as_a_set_verifies_and_is_removed_whole(
    hive: Hive, hub_repos: dict[str, Path]
) -> None:
    run = hive.run("models", "add", "hf:rbee/split-GGUF")
    row = run.result
    names = ["tiny-split-Q8_0-00001-of-00003.gguf", "tiny-split-Q8_0-00002-of-00003.gguf"]
    assert hive.model_files() == [*names, "tiny-split-Q8_0-00003-of-00003.gguf"]
    assert row["name"] == "tiny-split-Q8_0" and Path(row["path"]).name == names[0]
    assert row["size"] == sum(hub_repos[f"part{i}"].stat().st_size for i in (1, 2, 3))
    assert any("in 3 parts" in m for m in logs(run))
    verify = [e for e in run.events if e.event == "progress" and e.data["phase"] == "verify"]
    assert verify and verify[-1].data["bytes"] == verify[-1].data["total"], "the verify row ends full"
    assert hive.run("models", "verify", row["name"]).result["ok"] is True
    hive.start("--port-min", "8700", "--port-max", "8799")
    worker = hive.run("worker", "spawn", "--model", row["name"], "--wait").result
    assert worker["state"] == "idle", "the worker opens the first part and llama.cpp finds the rest"
    hive.stop()
    assert hive.run("models", "rm", row["name"]).result["freed_bytes"] == row["size"]
    assert hive.model_files() == []
    again = hive.run("models", "add", "hf:rbee/split-GGUF/tiny-split-Q8_0-00001-of-00003.gguf")
    assert again.result["name"] == row["name"] and again.result["sha256"] == row["sha256"]
    (hive.home / "models" / names[1]).unlink()
    broken = hive.run("models", "verify", again.result["name"]).error
    assert broken["code"] == "INVALID_MODEL_FILE" and names[1] in broken["message"]
    assert hive.run("models", "rm", again.result["name"]).result["removed"] is True
    assert hive.model_files() == []


def keeper(file_server: FileServer, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RBEE_", "HF_"))}
    env.update(HF_ENDPOINT=file_server.url, HF_HOME=str(tmp / "hf"), RBEE_HIVE_DOWNLOAD_BACKOFF="0.01")
    argv = [str(Path(sys.prefix) / "bin" / "rbee-keeper"), *args]
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def test_keeper_models_search_lists_quantizations_with_sizes(
    file_server: FileServer, hub_repos: dict[str, Path], tmp_path: Path
) -> None:
    found = keeper(file_server, tmp_path, "--json", "models", "search", f"hf:{TINYLLAMA}")
    assert found.returncode == 0, found.stderr
    payload = json.loads(found.stdout)
    assert [q["tag"] for q in payload["quantizations"]] == list(QUANTS)
    assert [q["size"] for q in payload["quantizations"]] == [hub_repos[q].stat().st_size for q in QUANTS]
    assert payload["default"] == "tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf"
    split = json.loads(
        keeper(file_server, tmp_path, "--json", "models", "search", "hf:rbee/split-GGUF").stdout
    )
    assert len(split["quantizations"][0]["files"]) == 3
    human = keeper(file_server, tmp_path, "models", "search", f"hf:{TINYLLAMA}")
    assert "Q4_K_M" in human.stdout and "default" in human.stdout
    none = keeper(file_server, tmp_path, "models", "search", "hf:rbee/safetensors-only")
    assert none.returncode == 1 and "no .gguf files" in none.stdout
    missing = keeper(file_server, tmp_path, "--json", "models", "search", "hf:nobody/nothing")
    assert missing.returncode == 1 and json.loads(missing.stdout)["error"]["code"] == "MODEL_NOT_FOUND"
    bad = keeper(file_server, tmp_path, "models", "search", "https://example.invalid/x.gguf")
    assert bad.returncode == 1 and "Hugging Face repo" in bad.stderr
