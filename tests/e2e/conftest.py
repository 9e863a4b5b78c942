"""Reliability suite: three real sshd nodes with their hives, a real `queen-rbee` in front.

Nodes `n2`, `n3`, `n4` are unprivileged OpenSSH servers on 127.0.0.2/.3/.4, each with
its own `$RBEE_HOME`; their sshd hands every command the hive options of this suite
through `SetEnv` (workers on ports 8900–8999, a 2 s health loop, a 5 s stop timeout).
Every node's catalog holds the tiny model as `tiny` (the same file, so the queen
offers one `tiny` owned by all three). Each test module gets its own queen
subprocess (`queen` fixture), stopped with SIGTERM at the end of the module, after
which `hive stop --all` must leave no process of the test homes and no listening
port in the hive range.

After every case the `guard` fixture checks that nothing was lost or leaked: the
inventory is byte-identical, each node's catalog holds exactly the rows the case
expects, and every hive/worker process of the test homes (and every port in
8900–8999 such a process listens on) belongs to a hive or worker its node knows
about: no orphans. Cases that kill things also stop the whole fleet themselves and
require zero leftovers. (The machine is shared: a listener in 8900–8999 that is not a
process of the test homes belongs to someone else and is ignored.)

`--soak` (give it with `tests/e2e` on the command line, so this conftest is loaded
before the arguments are parsed) enables the long variants. `record(name=value)`
stores a case's measured numbers; when the whole directory ran (no `-k`, no
deselection, nothing skipped by `-x`), the session writes `docs/reliability.md`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from rbee_worker.protocol.events import EventParser
from rbee_worker.tinymodel import write_tiny_model
from tests import sshd
from tests.keeper.conftest import Keeper, Run, make_keeper
from tests.worker_proc import free_port

E2E_DIR = Path(__file__).resolve().parent
REPO = E2E_DIR.parents[1]
REPORT_PATH = REPO / "docs" / "reliability.md"

PORT_MIN, PORT_MAX = 8900, 8999
NODE_ADDRESSES = {"n2": "127.0.0.2", "n3": "127.0.0.3", "n4": "127.0.0.4"}
HIVE_ENV = {
    "RBEE_HIVE_PORT_MIN": str(PORT_MIN),
    "RBEE_HIVE_PORT_MAX": str(PORT_MAX),
    "RBEE_HIVE_HEALTH_INTERVAL": "2",
    "RBEE_HIVE_STOP_TIMEOUT": "5",
}
QUEEN_KEY = "e2e-queen-key"
QUEEN_ADMIN_KEY = "e2e-queen-admin-key"
MODEL = "tiny"
#: what the command line of a hive (daemon or node command) or a worker contains
RBEE_MARKS = ("rbee-hive", "rbee_control.hive", "rbee-worker", "rbee_worker")
#: bound on waiting for processes to go away after a stop
SETTLE_SECONDS = 15.0


# --- the fleet ---------------------------------------------------------------------------


def start_node(factory: sshd.SshdFactory, address: str) -> sshd.SshdNode:
    """An sshd on `address` whose commands see this suite's hive options."""
    return factory.start(address).set_env(HIVE_ENV)


@dataclass
class Queen:
    """A `queen-rbee` subprocess over the fleet's inventory."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def client(self, key: str = QUEEN_KEY, timeout: float = 60.0) -> openai.AsyncOpenAI:
        """The official async SDK, no retries: a 503 is seen as a 503."""
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, timeout=timeout, max_retries=0)

    def http(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {QUEEN_KEY}"}, timeout=timeout
        )

    def admin(self, timeout: float = 30.0) -> httpx.Client:
        """The admin plane (`/v2/*`): registration and the worker table."""
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {QUEEN_ADMIN_KEY}"}, timeout=timeout
        )

    def workers(self) -> list[dict[str, Any]]:
        with self.admin() as client:
            response = client.get("/v2/workers/list")
        assert response.status_code == 200, response.text
        return list(response.json()["workers"])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"queen did not exit within {timeout}s of signal {sig}") from None

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class E2EFleet:
    base: Path
    keeper: Keeper
    homes: Path
    nodes: dict[str, sshd.SshdNode]
    model_file: Path
    inventory_bytes: bytes = b""
    #: catalog rows each node must hold after the current case
    expected_catalog: dict[str, set[str]] = field(default_factory=dict)
    queens: list[Queen] = field(default_factory=list)

    # --- node state, read from the node's files (same machine) -------------------

    def home(self, node: str) -> Path:
        return self.homes / node

    def catalog(self, node: str) -> set[str]:
        db = self.home(node) / "models.db"
        if not db.exists():
            return set()
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
            return {row[0] for row in conn.execute("SELECT name FROM models")}

    def worker_records(self, node: str) -> list[dict[str, Any]]:
        """The hive's `workers/<id>.json` records (they hold pid, port, url and the API key)."""
        records = []
        for path in sorted((self.home(node) / "workers").glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                records.append(json.loads(path.read_text()))
        return records

    def worker_record(self, worker_id: str) -> dict[str, Any]:
        for node in self.nodes:
            for record in self.worker_records(node):
                if record.get("id") == worker_id:
                    return record
        raise AssertionError(f"no record of worker {worker_id} on any node")

    def hive_pid(self, node: str) -> int | None:
        try:
            return int((self.home(node) / "hive.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def processes(self) -> list[psutil.Process]:
        """Live hive and worker processes (daemons and node commands) of the test homes.

        (`tests.keeper.conftest.rbee_processes` looks for "rbee-hive" in the command line,
        which a detached daemon, `python -m rbee_control.hive.cli daemon`, does not have.)
        """
        homes = str(self.homes)
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            text = " ".join(proc.info["cmdline"] or [])
            if (
                homes in text
                and any(mark in text for mark in RBEE_MARKS)
                and proc.info["status"] != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        return found

    def listening(self) -> dict[tuple[str, int], int | None]:
        """Listening TCP sockets in the hive port range held by processes of the test homes → pid.

        Only ours: this machine is shared, and another program may well listen on, say,
        127.0.0.2:8930 (seen in practice). A leaked worker of ours is a process of the test
        homes, so it is found by its command line.
        """
        ours = {p.pid for p in self.processes()}
        found: dict[tuple[str, int], int | None] = {}
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.pid not in ours:
                continue
            if PORT_MIN <= conn.laddr.port <= PORT_MAX:
                found[(conn.laddr.ip, conn.laddr.port)] = conn.pid
        return found

    def unaccounted(self) -> list[str]:
        """Processes and ports of the test homes that no hive knows about: orphans and leaks."""
        problems: list[str] = []
        known_workers: dict[int, str] = {}
        for node in self.nodes:
            for record in self.worker_records(node):
                known_workers[int(record.get("pid", -1))] = f"{node}/{record.get('id')}"
        hives = {self.hive_pid(node): node for node in self.nodes}
        for proc in self.processes():
            try:
                cmdline = proc.cmdline()
            except psutil.Error:
                continue
            text = " ".join(cmdline)
            if "rbee_worker" in text or "rbee-worker" in text:
                if proc.pid not in known_workers:
                    problems.append(f"orphan worker pid {proc.pid}: {text}")
            elif "daemon" in cmdline and proc.pid not in hives:
                problems.append(f"orphan hive pid {proc.pid}: {text}")
        for (ip, port), pid in self.listening().items():
            if pid not in known_workers:
                problems.append(f"port {ip}:{port} held by pid {pid}, not a known worker")
        return problems

    def check_kept(self) -> None:
        """Nothing lost: inventory byte-identical, catalogs exactly as expected, no orphans."""
        assert self.keeper.inventory.read_bytes() == self.inventory_bytes, "the inventory changed"
        catalogs = {node: self.catalog(node) for node in self.nodes}
        assert catalogs == self.expected_catalog, f"catalog rows: {catalogs} != {self.expected_catalog}"
        problems: list[str] = []
        for _ in range(20):  # a worker being stopped right now may take a moment to exit
            problems = self.unaccounted()
            if not problems:
                return
            time.sleep(0.25)
        raise AssertionError("leaked: " + "; ".join(problems) + "\n" + self.snapshot())

    def snapshot(self) -> str:
        """What runs and what the nodes know, for a failure message."""
        lines = []
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                lines.append(
                    f"  pid {proc.pid} ppid {proc.ppid()} {proc.status()}: {' '.join(proc.cmdline())}"
                )
        for node in self.nodes:
            records = [(r.get("id"), r.get("pid"), r.get("port")) for r in self.worker_records(node)]
            lines.append(f"  {node}: hive pid {self.hive_pid(node)}, worker records {records}")
        lines.append(f"  listening: {self.listening()}")
        return "\n".join(lines)

    # --- whole-fleet operations ----------------------------------------------------

    def stop_all(self) -> Run:
        """`hive stop --all`, then no process of the test homes and no port in range may be left."""
        for node in self.nodes.values():
            node.start()
        result = self.keeper.run("hive", "stop", "--all", timeout=120)
        deadline = time.monotonic() + SETTLE_SECONDS
        left, ports = self.processes(), self.listening()
        while (left or ports) and time.monotonic() < deadline:
            time.sleep(0.2)
            left, ports = self.processes(), self.listening()
        described = [" ".join(_cmdline(p)) for p in left]
        for proc in left:  # leave the machine clean even when the assertion below fails
            with contextlib.suppress(psutil.Error):
                proc.kill()
        assert result.rc == 0, str(result)
        assert not described, f"processes left after hive stop --all: {described}"
        assert not ports, f"ports still bound after hive stop --all: {sorted(ports)}"
        return result

    def start_queen(self, *extra: str, port: int | None = None) -> Queen:
        port = port or free_port()
        log = self.base / f"queen-{port}-{len(self.queens)}.log"
        env = {**self.keeper.env, "RBEE_QUEEN_API_KEY": QUEEN_KEY, "RBEE_QUEEN_ADMIN_KEY": QUEEN_ADMIN_KEY}
        argv = [
            sys.executable, "-m", "rbee_control.queen.cli", "--inventory", str(self.keeper.inventory),
            "--port", str(port), "--health-interval", "2", *extra,
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
            )
        queen = Queen(proc, f"http://127.0.0.1:{port}", log)
        self.queens.append(queen)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{queen.url}/health", timeout=1).status_code == 200:
                    return queen
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"queen did not start:\n{queen.text()}")
            time.sleep(0.1)

    def kill_strays(self) -> None:
        for queen in self.queens:
            if queen.alive():
                queen.proc.kill()
                queen.proc.wait(10)
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                proc.kill()


def sse_events(chunks: Iterator[bytes]) -> Iterator[tuple[str, Any]]:
    """(event name, parsed data) from a body's bytes, by the protocol's own parser (reads to the end)."""
    parser = EventParser()
    for chunk in chunks:
        for _raw, event in parser.feed(chunk):
            yield event.name, event.data
    for _raw, event in parser.close():
        yield event.name, event.data


def worker_stream(record: dict[str, Any], body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Stream one native request straight to a worker: its text, `end` and `error` payloads."""
    headers = {"Authorization": f"Bearer {record['api_key']}"}
    text: list[str] = []
    result: dict[str, Any] = {"end": None, "error": None}
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream("POST", f"{record['url']}/v1/inference", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200, response.read()
        for name, data in sse_events(response.iter_bytes()):
            if name == "token":
                text.append(data["t"])
            elif name in ("end", "error"):
                result[name] = data
    result["text"] = "".join(text)
    return result


def worker_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A worker's Prometheus samples, `name{labels}` → value."""
    response = httpx.get(
        f"{record['url']}/metrics", headers={"Authorization": f"Bearer {record['api_key']}"}, timeout=5
    )
    assert response.status_code == 200, response.text
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def stopped_requests(metrics: dict[str, float]) -> float:
    """Requests the worker counted as cancelled or disconnected."""
    return sum(
        metrics.get(f'rbee_worker_requests_total{{outcome="{o}"}}', 0.0)
        for o in ("cancelled", "disconnected")
    )


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return [f"pid {proc.pid} (gone)"]


@pytest.fixture(scope="session")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EFleet]:
    """Three sshd nodes, an inventory of them, a keeper, and `tiny` in every catalog."""
    base = tmp_path_factory.mktemp("e2e")
    try:
        factory = sshd.SshdFactory(base / "sshd")
        nodes = {name: start_node(factory, address) for name, address in NODE_ADDRESSES.items()}
    except sshd.SshdUnavailable as exc:
        pytest.fail(f"the e2e suite needs a real OpenSSH server: {exc}")
    homes = base / "homes"
    inventory = sshd.write_inventory(
        base / "inventory.yaml", nodes, homes, local_node=None, venv=Path(sys.prefix)
    )
    keeper = make_keeper(base, inventory, **HIVE_ENV)
    sshd.trust_nodes(keeper.config_dir, nodes.values())
    model = write_tiny_model(base / "tiny.gguf", seed=0)
    fleet = E2EFleet(base, keeper, homes, nodes, model, inventory.read_bytes())
    try:
        adds = {
            name: keeper.popen("models", "add", f"file:{model}", "--name", MODEL, "--node", name)
            for name in nodes
        }
        for name, proc in adds.items():
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"models add on {name}: {err.decode()}"
        fleet.expected_catalog = {name: {MODEL} for name in nodes}
        yield fleet
        for queen in fleet.queens:
            if queen.alive():
                assert queen.stop() == 0, queen.text()
        fleet.stop_all()
    finally:
        fleet.kill_strays()
        factory.close()


@pytest.fixture(autouse=True)
def guard(e2e: E2EFleet) -> Iterator[None]:
    """Every case: nodes up before; afterwards nothing lost or leaked (see `E2EFleet.check_kept`)."""
    for node in e2e.nodes.values():
        node.start()
    yield
    for node in e2e.nodes.values():
        node.start()
    e2e.check_kept()


@pytest.fixture(scope="module")
def queen(e2e: E2EFleet, request: pytest.FixtureRequest) -> Iterator[Queen]:
    """One queen per module (options from the module's `QUEEN_ARGS`); SIGTERM at the end must exit 0,
    then `hive stop --all` must leave nothing of the test homes behind."""
    extra = getattr(request.module, "QUEEN_ARGS", ())
    running = e2e.start_queen(*extra)
    yield running
    if running.alive():
        assert running.stop() == 0, running.text()
    e2e.stop_all()


@pytest.fixture(scope="session")
def soak(pytestconfig: pytest.Config) -> bool:
    return bool(pytestconfig.getoption("soak", default=False))


# --- the report --------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="rbee e2e: long variants (64 concurrent streams for 2 minutes, more fault rounds)",
    )


_RESULTS: dict[str, dict[str, Any]] = {}
_COLLECTED: list[str] = []
_DESELECTED: list[str] = []


def _in_e2e(item: pytest.Item) -> bool:
    return Path(str(item.path)).resolve().is_relative_to(E2E_DIR)


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """`record(completed=61, seconds=12.3)`: numbers that go into docs/reliability.md for this case."""
    numbers = _RESULTS.setdefault(request.node.nodeid, {}).setdefault("numbers", {})

    def put(**values: Any) -> None:
        numbers.update(values)

    return put


def pytest_deselected(items: list[pytest.Item]) -> None:
    _DESELECTED.extend(item.nodeid for item in items if _in_e2e(item))


def pytest_collection_finish(session: pytest.Session) -> None:
    _COLLECTED[:] = [item.nodeid for item in session.items if _in_e2e(item)]
    for item in session.items:
        if _in_e2e(item):
            entry = _RESULTS.setdefault(item.nodeid, {})
            module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
            entry["category"] = getattr(item.module, "CATEGORY", module.removeprefix("test_"))
            entry["file"] = Path(str(item.path)).name
            entry["name"] = item.name
            entry["xfail_reason"] = next(
                (str(m.kwargs.get("reason", "")) for m in item.iter_markers("xfail")), ""
            )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    entry = _RESULTS.setdefault(item.nodeid, {})
    if report.when == "call":
        entry["seconds"] = report.duration
        if report.passed:
            entry["outcome"] = "xpassed" if hasattr(report, "wasxfail") else "passed"
        elif report.skipped:
            entry["outcome"] = "xfail" if hasattr(report, "wasxfail") else "skipped"
        else:
            entry["outcome"] = "failed"
            crash = getattr(report.longrepr, "reprcrash", None)
            entry["failure"] = " ".join(str(getattr(crash, "message", report.longrepr)).split())[:600]
    elif report.when == "setup" and not report.passed:
        entry["outcome"] = "skipped" if report.skipped else "error (setup)"
    elif report.when == "teardown" and report.failed and entry.get("outcome") in ("passed", "xfail"):
        entry["outcome"] = "error (teardown)"
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The numbers each case recorded, also for partial runs (`-k`, `--soak`) that write no report."""
    rows = [(n, _RESULTS[n]) for n in _COLLECTED if _RESULTS.get(n, {}).get("numbers")]
    if not rows:
        return
    terminalreporter.section("rbee e2e: measured")
    for nodeid, row in rows:
        numbers = ", ".join(f"{k} {_fmt(v)}" for k, v in row["numbers"].items())
        terminalreporter.write_line(f"{row.get('outcome', '?'):8} {nodeid.split('::')[-1]}: {numbers}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write docs/reliability.md, but only from a run of the whole directory."""
    if not _COLLECTED or _DESELECTED or exitstatus == pytest.ExitCode.INTERRUPTED:
        return
    on_disk = {p.name for p in E2E_DIR.glob("test_*.py")}
    collected_files = {_RESULTS[n].get("file") for n in _COLLECTED}
    if on_disk != collected_files or any("outcome" not in _RESULTS[n] for n in _COLLECTED):
        return
    REPORT_PATH.write_text(_render(session.config))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _render(config: pytest.Config) -> str:
    rows = [_RESULTS[n] for n in _COLLECTED]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
    total = sum(row.get("seconds", 0.0) for row in rows)
    argv0 = sys.argv[0]
    program = "python -m pytest" if argv0.endswith("__main__.py") else os.path.basename(argv0)
    command = " ".join([program, *(shlex.quote(a) for a in config.invocation_params.args)])
    soak = "yes" if config.getoption("soak", default=False) else "no"
    lines = [
        "# Reliability",
        "",
        "Generated by `tests/e2e/conftest.py` from the run described here; do not edit by hand. Three real",
        "sshd nodes (127.0.0.2–.4) with their hives, a real `queen-rbee` subprocess in front, the tiny",
        "model, one-slot workers. After every case the suite checks that nothing was lost or leaked",
        "(inventory byte-identical, catalog rows as expected, every process and port in 8900–8999",
        "accounted for); every module ends with `hive stop --all` leaving no process and no port.",
        "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- command: `{command}` (from `{config.invocation_params.dir}`; soak: {soak})",
        f"- machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        f"- result: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}; {total:.0f} s in the cases",
        "",
        "| case | category | outcome | measured | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        numbers = ", ".join(f"{k} {_fmt(v)}" for k, v in row.get("numbers", {}).items()) or "-"
        seconds = f"{row.get('seconds', 0.0):.1f}"
        lines.append(f"| `{row['name']}` | {row['category']} | {row['outcome']} | {numbers} | {seconds} |")
    failed = [row for row in rows if row.get("failure")]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- `{row['name']}`: {row['failure']}" for row in failed]
    known = [row for row in rows if row["outcome"] in ("xfail", "xpassed") and row.get("xfail_reason")]
    if known:
        lines += ["", "## Known product bugs (strict xfail)", ""]
        lines += [f"- `{row['name']}`: {row['xfail_reason']}" for row in known]
    return "\n".join(lines) + "\n"
