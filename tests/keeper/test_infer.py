"""`rbee-keeper infer` end to end: cold and warm paths on every kind of node, and what goes wrong."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from rbee_worker.protocol.client import WorkerClient
from rbee_worker.tinymodel import write_tiny_model

from ..waiting import wait_for
from .conftest import Fleet, Keeper, make_keeper, read_some, stop_fleet

PROMPT = "Once upon a time"
SEED = "11"
#: Far more than the tiny model streams in the time a test waits before interrupting it.
LONG = "4000"


def _phases(stderr: str) -> dict[str, float]:
    """The phase times of the human summary line: `… (reuse 0.04s, connect 0.04s, …)`."""
    match = re.search(r"\(((?:\w+ \d+\.\d+s(?:, )?)+)\)\s*$", stderr.strip())
    assert match, f"no summary line with phases on stderr:\n{stderr}"
    return {name: float(value) for name, value in re.findall(r"(\w+) (\d+\.\d+)s", match.group(1))}


def _worker(keeper: Keeper, node: str) -> dict[str, Any]:
    (entry,) = [w for w in keeper.known_workers() if w["node"] == node]
    return entry


def _metrics(worker: dict[str, Any]) -> dict[str, float]:
    async def read() -> str:
        async with WorkerClient(worker["url"], worker["api_key"]) as client:
            return await client.metrics_text()

    text = asyncio.run(read())
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


@pytest.mark.parametrize("node", ["n2", "n3", "local"])
def test_infer_cold_then_warm(
    fleet: Fleet, tiny_model: Path, node: str, capsys: pytest.CaptureFixture[str]
) -> None:
    keeper = fleet.keeper
    cold = keeper.run(
        "infer", "--node", node, "--model", f"file:{tiny_model}", "--name", "tiny",
        "--prompt", PROMPT, "--seed", SEED, "--max-tokens", "24",
    )  # fmt: skip
    assert cold.rc == 0, cold
    assert f"starting a worker for tiny on {node}" in cold.err
    assert re.search(r"24 tokens, TTFT [\d.]+ ms, [\d.]+ tokens/s, max_tokens", cold.err), cold.err
    if node != "local":
        assert f"{node}: push {tiny_model.name}" in cold.err, "file: refs are pushed to ssh nodes"
    cold_phases = _phases(cold.err)
    assert {"hive", "provision", "spawn", "stream"} <= set(cold_phases), cold_phases

    warm = keeper.run(
        "infer",
        "--node",
        node,
        "--model",
        "tiny",
        "--prompt",
        PROMPT,
        "--seed",
        SEED,
        "--max-tokens",
        "24",
        json_mode=True,
    )
    assert warm.rc == 0, warm
    assert warm.err == "", "--json mode prints nothing else"
    summary = json.loads(warm.out)
    assert set(summary["phases_s"]) == {"reuse", "stream"}, f"warm path must be HTTP only: {summary}"
    assert summary["node"] == node and summary["model"] == "tiny" and summary["tokens"] == 24
    assert summary["worker"] == _worker(keeper, node)["id"]
    # same seed, same tokens: stdout of the cold run held exactly the tokens and a final newline
    assert cold.out == summary["text"] + "\n"

    warm_human = keeper.run(
        "infer", "--node", node, "--model", "tiny", "--prompt", PROMPT, "--seed", SEED, "--max-tokens", "24"
    )
    assert warm_human.rc == 0 and warm_human.out == cold.out
    assert f"using worker {summary['worker']}" in warm_human.err
    with capsys.disabled():
        print(
            f"\n[keeper] infer {node}: cold {cold.seconds:.2f}s {cold_phases} | "
            f"warm {warm.seconds:.2f}s {summary['phases_s']} ttft {summary['ttft_ms']} ms"
        )


def test_warm_overhead_vs_calling_the_worker_directly(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    keeper = fleet.keeper
    worker = _worker(keeper, "n2")
    body = {"prompt": PROMPT, "max_tokens": 24, "seed": int(SEED)}
    headers = {"Authorization": f"Bearer {worker['api_key']}"}

    def direct() -> float:
        started = time.perf_counter()
        with (
            httpx.Client(timeout=10) as client,
            client.stream("POST", f"{worker['url']}/v1/inference", json=body, headers=headers) as response,
        ):
            assert response.status_code == 200
            for _ in response.iter_lines():
                pass
        return time.perf_counter() - started

    client_script = (
        "import httpx,sys,json\n"
        "with httpx.stream('POST', sys.argv[1] + '/v1/inference', json=json.loads(sys.argv[2]),"
        " headers={'Authorization': 'Bearer ' + sys.argv[3]}, timeout=10) as r:\n"
        "    [sys.stdout.write(l) for l in r.iter_lines()]\n"
    )

    def direct_process() -> float:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", client_script, worker["url"], json.dumps(body), worker["api_key"]],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        return time.perf_counter() - started

    in_process = min(direct() for _ in range(3))
    as_process = min(direct_process() for _ in range(2))
    runs = [
        keeper.run(
            "infer",
            "--node",
            "n2",
            "--model",
            "tiny",
            "--prompt",
            PROMPT,
            "--max-tokens",
            "24",
            json_mode=True,
        )
        for _ in range(2)
    ]
    assert all(r.rc == 0 for r in runs)
    best = min(runs, key=lambda r: r.seconds)
    phases = best.json()["phases_s"]
    with capsys.disabled():
        print(
            f"\n[keeper] warm overhead: keeper wall {best.seconds:.3f}s (phases {phases}); direct HTTP "
            f"in-process {in_process:.3f}s, direct HTTP from a fresh python {as_process:.3f}s"
        )
    # the warm path is the cached worker and its stream, nothing else (the timings above are printed:
    # a bound on them would only measure how busy the machine is)
    assert set(phases) == {"reuse", "stream"}, phases
    assert all(r.json()["worker"] == worker["id"] for r in runs), [r.json() for r in runs]


def test_status_lists_workers_without_their_api_keys(fleet: Fleet) -> None:
    keeper = fleet.keeper
    keys = [w["api_key"] for w in keeper.known_workers()]
    assert len(keys) == 3
    for args in (("status",), ("hive", "status", "--all"), ("worker", "list")):
        run = keeper.run(*args, json_mode=True)
        assert run.rc == 0, run
        assert not any(key in run.out for key in keys), f"{args} prints worker API keys"
        if args == ("status",):
            states = {node: [w["state"] for w in info["workers"]] for node, info in run.json().items()}
            assert states == {"local": ["idle"], "n2": ["idle"], "n3": ["idle"]}


def test_model_not_on_node_and_not_a_ref(fleet: Fleet) -> None:
    run = fleet.keeper.run("infer", "--node", "n3", "--model", "llama-7b", "--prompt", "hi")
    assert run.rc == 1, run
    assert run.out == ""
    assert "MODEL_NOT_FOUND" in run.err and "llama-7b" in run.err and "n3" in run.err
    assert "try: rbee-keeper models add" in run.err and "--name llama-7b --node n3" in run.err


def test_unreachable_node_fails_fast_while_its_workers_still_serve(fleet: Fleet) -> None:
    keeper, n3 = fleet.keeper, fleet.nodes["n3"]
    n3.stop()
    try:
        run = keeper.run("infer", "--node", "n3", "--model", "other", "--prompt", "hi")
        as_json = keeper.run("infer", "--node", "n3", "--model", "other", "--prompt", "hi", json_mode=True)
        # the data plane does not need SSH: the known worker on n3 still answers
        warm = keeper.run(
            "infer", "--node", "n3", "--model", "tiny", "--prompt", "hi", "--max-tokens", "20", json_mode=True
        )
    finally:
        n3.start()
    assert run.rc == 1 and "CONNECTION_FAILED" in run.err, run
    assert f"{n3.host}:{n3.port}" in run.err
    error = as_json.json()["error"]
    assert error["code"] == "CONNECTION_FAILED" and error["details"]["node"] == "n3"
    assert error["details"]["attempts"] == 3, "a closed port: quick retries, never a connect timeout"
    assert warm.rc == 0 and set(warm.json()["phases_s"]) == {"reuse", "stream"}, warm


def test_wrong_api_key_in_cache_falls_back_to_the_hive(fleet: Fleet) -> None:
    keeper = fleet.keeper
    path = keeper.config_dir / "known_workers.json"
    assert path.stat().st_mode & 0o777 == 0o600
    data = json.loads(path.read_text())
    good = _worker(keeper, "n2")
    for entry in data["workers"]:
        if entry["node"] == "n2":
            entry["api_key"] = "not-the-key"
    path.write_text(json.dumps(data))

    run = keeper.run(
        "infer", "--node", "n2", "--model", "tiny", "--prompt", PROMPT, "--max-tokens", "20", json_mode=True
    )
    assert run.rc == 0, run
    summary = run.json()
    assert summary["tokens"] == 20 and summary["worker"] == good["id"]
    assert "hive" in summary["phases_s"] and "spawn" not in summary["phases_s"], "the idle worker is reused"
    assert _worker(keeper, "n2")["api_key"] == good["api_key"], "the cache is repaired"


def test_ctrl_c_cancels_the_remote_request(fleet: Fleet) -> None:
    keeper = fleet.keeper
    worker = _worker(keeper, "n3")
    before = _metrics(worker)
    proc = keeper.popen("infer", "--node", "n3", "--model", "tiny", "--prompt", PROMPT, "--max-tokens", LONG)
    try:
        read_some(proc, 20, timeout=20)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode()
    assert "interrupted" in err.decode()

    def settled() -> dict[str, float] | None:
        after = _metrics(worker)
        stopped = sum(
            after.get(f'rbee_worker_requests_total{{outcome="{o}"}}', 0)
            for o in ("disconnected", "cancelled")
        )
        was = sum(
            before.get(f'rbee_worker_requests_total{{outcome="{o}"}}', 0)
            for o in ("disconnected", "cancelled")
        )
        return after if stopped == was + 1 and after["rbee_worker_slots_busy"] == 0 else None

    after = wait_for(settled, timeout=10, what="the worker to record the cancelled request")
    generated = after["rbee_worker_tokens_total"] - before.get("rbee_worker_tokens_total", 0)
    assert 0 < generated < int(LONG) / 2, f"generation stopped early: {generated} tokens of {LONG}"


def test_worker_killed_mid_stream_keeps_the_partial_answer(fleet: Fleet) -> None:
    keeper = fleet.keeper
    listed = keeper.run("worker", "list", "--node", "n2", json_mode=True).json()["n2"]
    (worker,) = listed
    proc = keeper.popen("infer", "--node", "n2", "--model", "tiny", "--prompt", PROMPT, "--max-tokens", LONG)
    try:
        first = read_some(proc, 20, timeout=20)
        os.kill(worker["pid"], signal.SIGKILL)
        rest, err_bytes = proc.communicate(timeout=20)
    finally:
        proc.kill()
    err = err_bytes.decode()
    assert proc.returncode == 1, err
    assert "WORKER_CRASHED" in err
    match = re.search(r"saved in (\S+)", err)
    assert match, f"the user must be told where the partial answer is: {err}"
    saved = Path(match.group(1))
    assert saved.parent == keeper.state_dir / "rbee"
    shown = first + rest
    # Counted in bytes: the tiny model's text holds U+FFFD, three bytes for one character.
    assert len(shown) >= 20, shown
    assert saved.read_bytes() == shown, "stdout and the saved file hold the same text"
    assert not [w for w in keeper.known_workers() if w["node"] == "n2"], "the dead worker is forgotten"

    again = keeper.run(
        "infer", "--node", "n2", "--model", "tiny", "--prompt", PROMPT, "--max-tokens", "20", json_mode=True
    )
    assert again.rc == 0, again
    assert "spawn" in again.json()["phases_s"] and again.json()["worker"] != worker["id"]


def test_worker_killed_mid_stream_json_details(fleet: Fleet) -> None:
    keeper = fleet.keeper
    (worker,) = keeper.run("worker", "list", "--node", "local", json_mode=True).json()["local"]
    known = _worker(keeper, "local")
    proc = keeper.popen(
        "infer",
        "--node",
        "local",
        "--model",
        "tiny",
        "--prompt",
        PROMPT,
        "--max-tokens",
        LONG,
        json_mode=True,
    )
    try:
        wait_for(
            lambda: _metrics(known)["rbee_worker_slots_busy"] == 1,
            timeout=20,
            interval=0.05,
            what="a busy slot",
        )
        time.sleep(0.2)
        os.kill(worker["pid"], signal.SIGKILL)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 1
    error = json.loads(out)["error"]
    assert error["code"] == "WORKER_CRASHED"
    details = error["details"]
    assert details["tokens_received"] > 0 and details["partial_text"]
    assert Path(details["saved_to"]).read_bytes().decode() == details["partial_text"]


def test_idle_shutdown_then_fresh_spawn(tmp_path: Path, tiny_model: Path) -> None:
    inventory = tmp_path / "inventory.yaml"
    home = tmp_path / "homes" / "box"
    home.mkdir(parents=True)
    inventory.write_text(f"nodes:\n  box:\n    transport: local\n    home: '{home}'\n")
    keeper = make_keeper(
        tmp_path,
        inventory,
        RBEE_HIVE_IDLE_TIMEOUT="1",
        RBEE_HIVE_POLL_INTERVAL="0.2",
        RBEE_HIVE_HEALTH_INTERVAL="0.5",
    )
    try:
        first = keeper.run(
            "infer",
            "--node",
            "box",
            "--model",
            f"file:{tiny_model}",
            "--name",
            "tiny",
            "--prompt",
            "hi",
            "--max-tokens",
            "20",
            json_mode=True,
        )
        assert first.rc == 0, first
        worker_id = first.json()["worker"]

        def worker_processes() -> list[psutil.Process]:
            return [
                p
                for p in psutil.process_iter(["cmdline", "status"])
                if worker_id in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE
            ]

        wait_for(lambda: not worker_processes(), timeout=20, what="the idle worker to shut down")
        assert keeper.run("worker", "list", "--node", "box", json_mode=True).json()["box"] == []

        second = keeper.run(
            "infer",
            "--node",
            "box",
            "--model",
            "tiny",
            "--prompt",
            "hi",
            "--max-tokens",
            "20",
            json_mode=True,
        )
        assert second.rc == 0, second
        summary = second.json()
        assert summary["worker"] != first.json()["worker"] and "spawn" in summary["phases_s"]
        assert [w["id"] for w in keeper.known_workers()] == [summary["worker"]]
    finally:
        stop_fleet(keeper, tmp_path / "homes")


CHAT_TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"


def test_infer_sends_one_chat_turn_when_the_model_has_a_template(fleet: Fleet, tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "chat.gguf", chat_template=CHAT_TEMPLATE)
    keeper = fleet.keeper
    common = ("--node", "local", "--prompt", "hi bee", "--max-tokens", "1", "--seed", SEED)
    chat = keeper.run("infer", "--model", f"file:{model}", "--name", "tiny-chat", *common, json_mode=True)
    assert chat.rc == 0, chat
    raw = keeper.run("infer", "--model", "tiny-chat", "--raw", *common, json_mode=True)
    assert raw.rc == 0, raw
    (worker,) = [w for w in keeper.known_workers() if w["model"] == "tiny-chat"]

    def direct(prompt: str) -> int:
        """The prompt's token count, asked of the worker itself."""
        headers = {"Authorization": f"Bearer {worker['api_key']}"}
        body = {"prompt": prompt, "max_tokens": 1}
        response = httpx.post(f"{worker['url']}/v1/inference", json=body, headers=headers, timeout=30)
        end = response.text.split("event: end\ndata: ", 1)[1].split("\n", 1)[0]
        return int(json.loads(end)["prompt_tokens"])

    assert chat.json()["prompt_tokens"] == direct("[user] hi bee\n[assistant]")
    assert raw.json()["prompt_tokens"] == direct("hi bee")
