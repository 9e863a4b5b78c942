"""Bad input at every door: inventory files, values that reach a node's shell, HTTP bodies and
keys, model files. Each must be refused with a clear error, and change nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee_worker.tinymodel import write_tiny_model
from tests import sshd
from tests.keeper.conftest import make_keeper
from tests.worker_proc import WorkerProcess

from .conftest import MODEL, QUEEN_ADMIN_KEY, QUEEN_KEY, E2EFleet, Queen

CATEGORY = "bad input"
MIB = 1 << 20

# --- inventory files ------------------------------------------------------------------------


def _inventories(home: Path, marker: Path) -> dict[str, tuple[str | bytes, str]]:
    """name → (file content, the `:line:col` the error must point at; "" for a file-level error)."""
    local = f"transport: local, home: '{home}'"
    return {
        "unclosed flow": (f"nodes:\n  a: {{{local}}}\n   b: [\n", ":3:"),
        "tab indent": (f"nodes:\n  a:\n\ttransport: local\n    home: '{home}'\n", ":3:1"),
        "billion laughs": ('a: &a ["x","x"]\nb: &b [*a,*a]\nc: [*b,*b]\nnodes: {}\n', ":1:4"),
        "python tag": (f'nodes:\n  a: !!python/object/apply:os.system ["touch {marker}"]\n', ":2:6"),
        "custom tag": (f"nodes:\n  a: {{transport: local, home: !home '{home}'}}\n", ":2:"),
        "alias": ("nodes:\n  a: *x\n", ":2:6"),
        "duplicate node": (f"nodes:\n  a: {{{local}}}\n  a: {{{local}}}\n", ":3:3"),
        "deep nesting": ("nodes:\n  a: " + "[" * 5000 + "]" * 5000 + "\n", ":2:"),
        "port out of range": ("nodes:\n  a:\n    ssh: {host: 127.0.0.2, port: 99999}\n", ":3:"),
        "typo key": (f"nodes:\n  a:\n    trasport: local\n    home: '{home}'\n", ":3:5"),
        "not utf-8": (b"nodes:\n  a:\n    transport: local\n    home: \xff\xfe\n", ":4:"),
        "shell in node name": (f"nodes:\n  'x; touch {marker}': {{{local}}}\n", ":2:3"),
        "two documents": (f"nodes:\n  a: {{{local}}}\n---\nnodes: {{}}\n", ":3:"),
        "over 1 MiB": (f"nodes:\n  a: {{{local}}}\n" + "#" * (MIB + 10) + "\n", ""),
    }


def test_malformed_and_hostile_inventories_are_refused_unchanged(
    e2e: E2EFleet, tmp_path: Path, record: Any
) -> None:
    marker = tmp_path / "pwned"
    cases = _inventories(tmp_path / "home", marker)
    procs: dict[str, tuple[Path, bytes, list[subprocess.Popen[bytes]]]] = {}
    for i, (name, (content, _)) in enumerate(cases.items()):
        path = tmp_path / f"inv{i}" / "inventory.yaml"
        path.parent.mkdir()
        data = content if isinstance(content, bytes) else content.encode()
        path.write_bytes(data)
        keeper = make_keeper(path.parent, path)
        # a read (status), and an edit that must leave the file as it was
        add = ("setup", "add-node", "new", "--ssh-host", "127.0.0.2", "--trust")
        procs[name] = (path, data, [keeper.popen("status"), keeper.popen(*add)])
    checked = 0
    for name, (path, data, runs) in procs.items():
        where = cases[name][1]
        for proc in runs:
            out, err = proc.communicate(timeout=60)
            text = err.decode(errors="replace")
            assert proc.returncode == 1, f"{name}: exit {proc.returncode}\n{text}"
            assert "INVENTORY_INVALID" in text and "Traceback" not in text, f"{name}: {text}"
            assert re.search(re.escape(f"{path}{where}") + (r"\d+" if where.endswith(":") else ""), text), (
                f"{name}: the error must name {path}{where}…: {text}"
            )
            assert out == b""
            checked += 1
        assert path.read_bytes() == data, f"{name}: the inventory file was modified"
    assert not marker.exists(), "an inventory value was executed"
    record(files=len(cases), runs=checked)


def test_yaml_merge_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "inventory.yaml"
    data = f"nodes:\n  a:\n    <<: {{transport: local}}\n    home: '{tmp_path / 'home'}'\n".encode()
    path.write_bytes(data)
    run = make_keeper(tmp_path, path).run("setup", "list-nodes")
    assert path.read_bytes() == data
    assert run.rc == 1 and "INVENTORY_INVALID" in run.err and f"{path}:3:" in run.err, run


# --- values that reach a node's command line ------------------------------------------------------


def test_shell_metacharacters_never_reach_a_shell(e2e: E2EFleet, tmp_path: Path, record: Any) -> None:
    keeper = e2e.keeper
    marker = tmp_path / "pwned"
    evil = [f"x;touch {marker}", f"$(touch {marker})", f"`touch {marker}`", f"x' ; touch {marker}; '"]
    file_ref = f"file:{e2e.model_file}"
    argvs: list[tuple[str, ...]] = []
    for value in evil[:2]:
        argvs += [
            ("infer", "--node", "n2", "--model", value, "--prompt", "hi"),  # model name
            ("infer", "--node", "n3", "--model", file_ref, "--name", value, "--prompt", "hi"),  # --name
            ("models", "add", file_ref, "--node", "n4", "--name", value),
            ("worker", "stop", value, "--node", "n2"),  # worker id
        ]
    for value in evil[2:]:
        argvs += [
            ("models", "rm", value, "--node", "n3"),
            ("worker", "spawn", "--node", "n4", "--model", value),
            ("models", "add", file_ref, "--node", "n2", "--name", "fresh", "--sha256", value),
            ("models", "add", f"file:/tmp/{value}.gguf", "--node", "n2"),  # the ref itself
        ]
    results = []
    for start in range(0, len(argvs), 6):  # at most 6 keepers at once on two shared cores
        batch = [(argv, keeper.popen(*argv)) for argv in argvs[start : start + 6]]
        results += [(argv, proc, *proc.communicate(timeout=90)) for argv, proc in batch]
    for argv, proc, out, err in results:
        text = err.decode(errors="replace")
        assert proc.returncode == 1, f"{argv}: exit {proc.returncode}\n{text}"
        assert "Traceback" not in text and re.search(r"error \[[A-Z_]+\]", text), f"{argv}: {text}"
        assert out == b"", argv
    assert not marker.exists(), "a value was run by a shell on a node"

    # inventory fields that reach the node's command line: a home with shell syntax in its name
    home = tmp_path / f"h;touch {marker}; $(touch {marker}) `touch {marker}`"
    home.mkdir(parents=True)  # the marker's slashes make it a nested path
    (home / "venv").symlink_to(e2e.home("n2") / "venv")
    node = e2e.nodes["n2"]
    path = tmp_path / "weird.yaml"
    ssh = f"{{host: {node.host}, port: {node.port}, user: {node.user}, key: '{node.client_key}'}}"
    path.write_text(f'nodes:\n  weird:\n    ssh: {ssh}\n    home: "{home}"\n')
    weird = make_keeper(tmp_path / "weird", path)
    sshd.trust_nodes(weird.config_dir, [node])
    listed = weird.run("models", "list", "--node", "weird", json_mode=True)
    assert listed.rc == 0, listed
    assert listed.json() == {"weird": []}
    assert not marker.exists(), "the node's home was run by a shell"
    record(commands=len(results) + 1, marker_created=marker.exists())


def test_models_add_with_a_name_already_used_is_refused(e2e: E2EFleet, tmp_path: Path) -> None:
    other = write_tiny_model(tmp_path / "other.gguf", seed=9)
    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    run = e2e.keeper.run(
        "models", "add", f"file:{other}", "--name", MODEL, "--node", "n2", "--sha256", digest, json_mode=True
    )
    assert run.rc == 1, f"accepted: {run.out[:300]}"
    assert "Traceback" not in run.err


# --- HTTP bodies and keys -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(e2e: E2EFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker of its own (not of a hive), so its routes can be hammered without touching the fleet."""
    process = WorkerProcess(e2e.model_file, log_dir=tmp_path_factory.mktemp("bad-input-worker"))
    try:
        process.wait_ready()
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def registered(queen: Queen, worker: WorkerProcess) -> str:
    """The direct worker registered with the queen as `direct`: valid requests need no cold start."""
    with queen.admin() as client:
        response = client.post(
            "/v2/workers/register", json={"url": worker.url, "api_key": worker.api_key, "model": "direct"}
        )
    assert response.status_code == 201, response.text
    return "direct"


BODY_ROUTES = {
    "worker": ["/v1/inference"],
    "queen": ["/v1/chat/completions", "/v1/completions", "/v1/inference", "/v2/workers/register"],
}
BAD_BODIES: dict[str, bytes] = {
    "oversized 9 MiB": b'{"prompt": "' + b"a" * (9 * MIB) + b'"}',
    "invalid JSON": b'{"prompt": ',
    "not UTF-8": b'{"prompt": "\xff\xfe"}',
    "empty": b"",
    "a JSON list": b"[1, 2, 3]",
    "JSON null": b"null",
    "huge number": b'{"prompt": "x", "model": "direct", "max_tokens": 1e400}',
}
#: routes that take no body: junk sent to them is ignored, never a crash (the worker's
#: /v1/admin/shutdown takes none either, and drains whatever it is sent: left out)
BODYLESS_ROUTES = {
    "worker": [
        ("GET", "/health"), ("GET", "/v1/ready"), ("GET", "/v1/loading/progress"), ("GET", "/metrics"),
        ("DELETE", "/v1/inference/some-id"),
    ],
    "queen": [
        ("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v2/workers/list"),
        ("DELETE", "/v1/inference/some-id"), ("DELETE", "/v2/workers/some-id"),
    ],
}  # fmt: skip
#: bodies the JSON parser itself cannot take apart without help
DEEP_BODY = b"[" * 100_000 + b"]" * 100_000


def _plane_key(path: str, key: str) -> str:
    """The queen's admin plane (`/v2/*`) takes the admin key; everything else the given one."""
    return QUEEN_ADMIN_KEY if key == QUEEN_KEY and path.startswith("/v2/") else key


def _post(url: str, path: str, body: bytes, key: str, method: str = "POST") -> httpx.Response:
    headers = {"Authorization": f"Bearer {_plane_key(path, key)}", "Content-Type": "application/json"}
    with httpx.Client(timeout=30) as client:
        return client.request(method, f"{url}{path}", content=body, headers=headers)


def _is_error_body(response: httpx.Response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error.get("code"), str) and isinstance(error.get("message"), str)


def _alive(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=5).status_code == 200


def _targets(worker: WorkerProcess, queen: Queen) -> dict[str, tuple[str, str]]:
    return {"worker": (worker.url, worker.api_key), "queen": (queen.url, QUEEN_KEY)}


def test_oversized_and_invalid_bodies_get_4xx_and_the_process_lives(
    worker: WorkerProcess, queen: Queen, registered: str, record: Any
) -> None:
    answers: dict[int, int] = {}
    problems = []
    for target, (url, key) in _targets(worker, queen).items():
        for path in BODY_ROUTES[target]:
            for name, body in BAD_BODIES.items():
                response = _post(url, path, body, key)
                answers[response.status_code] = answers.get(response.status_code, 0) + 1
                if not (400 <= response.status_code < 500 and _is_error_body(response)):
                    problems.append(f"{target} {path} {name}: {response.status_code} {response.text[:200]}")
                if name.startswith("oversized") and response.status_code != 413:
                    problems.append(f"{target} {path} {name}: {response.status_code}, expected 413")
            assert _alive(url), f"{target} died"
        for method, path in BODYLESS_ROUTES[target]:
            for name in ("oversized 9 MiB", "invalid JSON"):
                response = _post(url, path, BAD_BODIES[name], key, method)
                answers[response.status_code] = answers.get(response.status_code, 0) + 1
                if response.status_code >= 500:
                    problems.append(f"{target} {method} {path} {name}: {response.status_code}")
            assert _alive(url), f"{target} died"
    assert not problems, "\n".join(problems)
    # still serving, through the queen and directly
    with queen.http() as client:
        reply = client.post(
            "/v1/chat/completions",
            json={"model": registered, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        )
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "length", reply.text
    record(requests=sum(answers.values()), **{f"http_{k}": v for k, v in sorted(answers.items())})


def test_deeply_nested_json_is_a_4xx(worker: WorkerProcess, queen: Queen, registered: str) -> None:
    problems = []
    for target, (url, key) in _targets(worker, queen).items():
        for path in BODY_ROUTES[target]:
            response = _post(url, path, DEEP_BODY, key)
            if not (400 <= response.status_code < 500 and _is_error_body(response)):
                problems.append(f"{target} {path}: {response.status_code} {response.text[:120]}")
        assert _alive(url), f"{target} died"
    assert not problems, "\n".join(problems)


def _protected(worker: WorkerProcess, queen: Queen) -> list[tuple[str, str, str, str]]:
    """(target, method, path, right key) for every route that needs a key."""
    worker_routes = [
        ("GET", "/v1/ready"), ("GET", "/v1/loading/progress"), ("POST", "/v1/inference"),
        ("DELETE", "/v1/inference/some-id"), ("POST", "/v1/admin/shutdown"), ("GET", "/metrics"),
    ]  # fmt: skip
    queen_routes = [
        ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"), ("POST", "/v1/inference"), ("DELETE", "/v1/inference/some-id"),
        ("POST", "/v2/workers/register"), ("GET", "/v2/workers/list"), ("DELETE", "/v2/workers/some-id"),
    ]  # fmt: skip
    return [("worker", m, p, worker.api_key) for m, p in worker_routes] + [
        ("queen", m, p, _plane_key(p, QUEEN_KEY)) for m, p in queen_routes
    ]


def test_wrong_or_absent_keys_are_401_on_every_protected_route(
    worker: WorkerProcess, queen: Queen, registered: str, record: Any
) -> None:
    urls = {"worker": worker.url, "queen": queen.url}
    other = {"worker": QUEEN_KEY, "queen": worker.api_key}
    body = {"model": registered, "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    problems, sent = [], 0
    with httpx.Client(timeout=10) as client:
        for target, method, path, key in _protected(worker, queen):
            variants: dict[str, dict[str, str]] = {
                "absent": {},
                "wrong": {"Authorization": "Bearer wrong"},
                "scheme only": {"Authorization": "Bearer"},
                "key without scheme": {"Authorization": key},
                "basic scheme": {"Authorization": f"Basic {key}"},
                "key plus a suffix": {"Authorization": f"Bearer {key}x"},
                "key prefix": {"Authorization": f"Bearer {key[:-1]}"},
                "the other service's key": {"Authorization": f"Bearer {other[target]}"},
            }
            for name, headers in variants.items():
                response = client.request(
                    method, f"{urls[target]}{path}", headers=headers, json=body if method == "POST" else None
                )
                sent += 1
                error = response.json().get("error", {}) if _is_error_body(response) else {}
                if response.status_code != 401 or error.get("code") != "INVALID_API_KEY":
                    problems.append(
                        f"{target} {method} {path} [{name}]: {response.status_code} {response.text[:120]}"
                    )
                elif response.headers.get("www-authenticate") != "Bearer":
                    problems.append(f"{target} {method} {path} [{name}]: no WWW-Authenticate: Bearer")
        for url in urls.values():
            assert client.get(f"{url}/health").status_code == 200, "/health needs no key"
    assert not problems, "\n".join(problems)
    # nothing reached a handler: the worker did not start draining, and serves as before
    ready = httpx.get(f"{worker.url}/v1/ready", headers=worker.headers, timeout=5)
    assert ready.status_code == 200 and ready.json()["state"] == "ready", ready.text
    record(requests=sent)


# --- model files ------------------------------------------------------------------------------------


def _gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


ARCH_KV = _gguf_string(b"general.architecture") + struct.pack("<I", 8) + _gguf_string(b"llama")


def _patched(model: bytes, key: bytes, value: int) -> bytes:
    """`model` with the uint32 metadata value of `key` replaced."""
    at = model.index(_gguf_string(key)) + len(_gguf_string(key))
    assert struct.unpack_from("<I", model, at)[0] == 4, "expected a uint32 field"
    return model[: at + 4] + struct.pack("<I", value) + model[at + 8 :]


def _add_all(e2e: E2EFleet, files: dict[str, Path], node: str) -> dict[str, Any]:
    procs = {
        name: e2e.keeper.popen("models", "add", f"file:{path}", "--node", node, "--name", f"bad-{name}")
        for name, path in files.items()
    }
    return {name: (proc, *proc.communicate(timeout=90)) for name, proc in procs.items()}


def test_truncated_and_structurally_absurd_ggufs_are_refused(
    e2e: E2EFleet, tmp_path: Path, record: Any
) -> None:
    good = write_tiny_model(tmp_path / "good.gguf", seed=5).read_bytes()
    contents = {
        "truncated": good[: len(good) // 2],
        "header-only": good[:24],
        "not-gguf": b"PK\x03\x04" + good[4:1000],
        "kv-count": _header(0, 2**63) + ARCH_KV,
        "tensor-count": _header(2**60, 1) + ARCH_KV,
        "string-length": _header(0, 1) + _gguf_string(b"general.architecture") + struct.pack("<IQ", 8, 2**62),
        "array-length": _header(0, 2)
        + ARCH_KV
        + _gguf_string(b"tokenizer.ggml.tokens")
        + struct.pack("<IIQ", 9, 8, 2**60),
        "context-4G": _patched(good, b"llama.context_length", 0xFFFFFFFF),
    }
    files = {}
    for name, data in contents.items():
        files[name] = tmp_path / f"{name}.gguf"
        files[name].write_bytes(data)
    results = _add_all(e2e, files, "n3")
    for name, (proc, _out, err) in results.items():
        text = err.decode(errors="replace")
        assert proc.returncode == 1, f"{name}: exit {proc.returncode}\n{text}"
        assert "INVALID_MODEL_FILE" in text and "Traceback" not in text, f"{name}: {text}"
        assert files[name].read_bytes() == contents[name], f"{name}: the operator's file was modified"
    assert e2e.catalog("n3") == {MODEL}, "no catalog row for a refused file"
    leftovers = [p.name for p in (e2e.home("n3") / "models").iterdir() if p.name.startswith("bad-")]
    assert not leftovers, f"files of refused models left on the node: {leftovers}"
    record(files=len(files))


def test_ggufs_with_absurd_model_shape_are_refused(e2e: E2EFleet, tmp_path: Path) -> None:
    good = write_tiny_model(tmp_path / "good.gguf", seed=6).read_bytes()
    files = {
        "heads-0": _patched(good, b"llama.attention.head_count", 0),
        "layers-4G": _patched(good, b"llama.block_count", 0xFFFFFFFF),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.gguf"
        paths[name].write_bytes(data)
    try:
        results = _add_all(e2e, paths, "n4")
        accepted = sorted(name for name, (proc, _, _) in results.items() if proc.returncode == 0)
    finally:
        for name in e2e.catalog("n4") - {MODEL}:  # leave the catalog as the session expects it
            e2e.keeper.run("models", "rm", name, "--node", "n4")
    assert accepted == [], f"catalogued although absurd: {accepted}"


def test_worker_port_zero_binds_a_free_port(e2e: E2EFleet, tmp_path: Path) -> None:
    argv = [
        sys.executable, "-m", "rbee_worker.cli", "serve", "--model", str(e2e.model_file),
        "--host", "127.0.0.1", "--port", "0", "--threads", "1",
    ]  # fmt: skip
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "RBEE_WORKER_API_KEY": "k"}
        )
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        text = log.read_text(errors="replace")
        assert proc.poll() is None, f"exited {proc.returncode}: {text[-600:]}"
        assert "Traceback" not in text, text
    finally:
        proc.kill()
        proc.wait(10)
