"""The NodeTransport contract, held against both a real sshd node and a local node."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rbee_control.inventory.model import Inventory
from rbee_control.ssh.command import NodePath
from rbee_control.ssh.pool import open_transport
from rbee_control.ssh.transport import NodeTransport
from rbee_worker.protocol.errors import ErrorCode, RbeeError

PY = sys.executable
SLEEPER = "import os, sys, time; print(os.getpid(), flush=True); time.sleep(60)"


@pytest.fixture(params=["local", "n2"])
async def transport(request: pytest.FixtureRequest, ssh_inventory: Inventory) -> AsyncIterator[NodeTransport]:
    t = await open_transport(ssh_inventory.node(request.param))
    try:
        yield t
    finally:
        await t.close()


async def gone(pid: int, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_run_collects_output_and_exit_status(transport: NodeTransport) -> None:
    result = await transport.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert not result.ok
    assert (await transport.run(["true"])).ok


async def test_stream_yields_lines_as_they_are_written(transport: NodeTransport, tmp_path: Path) -> None:
    """Line 1 is only written once the test has seen line 0: a buffered stream would never release it."""
    go = tmp_path / "go"  # the node shares this disk
    script = (
        "import os, sys, time\n"
        "print('line 0', flush=True)\n"
        "for _ in range(600):\n"
        "    if os.path.exists(sys.argv[1]):\n"
        "        break\n"
        "    time.sleep(0.05)\n"
        "print('line 1', 'released' if os.path.exists(sys.argv[1]) else 'never released', flush=True)\n"
        "print('line 2', flush=True)\n"
    )
    seen: list[str] = []
    async with transport.stream([PY, "-c", script, str(go)]) as proc:
        async for line in proc:
            seen.append(line)
            if line == "line 0":
                go.touch()
        result = await proc.wait()
    assert seen == ["line 0", "line 1 released", "line 2"]
    assert result.exit_status == 0 and result.stdout == ""


async def test_stderr_goes_to_the_callback_not_stdout(transport: NodeTransport) -> None:
    got: list[str] = []
    async with transport.stream(["sh", "-c", "echo a >&2; echo b; echo c >&2"], on_stderr=got.append) as proc:
        lines = [line async for line in proc]
        result = await proc.wait()
    assert lines == ["b"]
    assert got == ["a", "c"]
    assert result.stderr == "a\nc\n"


HOSTILE = [
    "'; touch {m} #",
    '"; touch {m}; echo "',
    "$(touch {m})",
    "`touch {m}`",
    "a\ntouch {m}\n",
    "&& touch {m}",
    "| touch {m}",
    "; touch {m}",
    "> {m}",
    "$HOME ~ * ? [a] {{x,y}} \\ ! %s",
    "--help",
    "",
    " leading and trailing spaces ",
    "ünïcödé ✓",
]
ECHO_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"
ECHO_ENV = "import json, os; print(json.dumps([os.environ[f'X{i}'] for i in range(int(os.environ['N']))]))"


async def test_arguments_and_env_values_are_passed_literally(
    transport: NodeTransport, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    args = [template.format(m=marker) for template in HOSTILE]
    result = await transport.run([PY, "-c", ECHO_ARGV, *args])
    assert json.loads(result.stdout) == args
    env = {f"X{i}": arg for i, arg in enumerate(args)} | {"N": str(len(args))}
    env_result = await transport.run([PY, "-c", ECHO_ENV], env=env)
    assert json.loads(env_result.stdout) == args
    assert (await transport.run(["printf", "%s", args[0]])).stdout == args[0]
    assert not marker.exists()


async def test_node_paths_expand_home_on_the_node(transport: NodeTransport) -> None:
    result = await transport.run(
        ["printf", "%s|%s", NodePath("~/a b/$(x)"), NodePath("/abs/p")], env={"P": NodePath("~/p")}
    )
    assert result.stdout == os.path.expanduser("~/a b/$(x)") + "|/abs/p"
    env_result = await transport.run(["sh", "-c", 'printf %s "$P"'], env={"P": NodePath("~/p q")})
    assert env_result.stdout == os.path.expanduser("~/p q")


async def test_stdin_is_fed_then_closed(transport: NodeTransport) -> None:
    data = b"hello\x00world\n" * 10000
    result = await transport.run(
        [PY, "-c", "import sys; d = sys.stdin.buffer.read(); print(len(d))"], stdin=data
    )
    assert result.stdout.strip() == str(len(data))
    no_stdin = await transport.run(["cat"], timeout=10)
    assert no_stdin.ok and no_stdin.stdout == ""


async def test_signal_and_missing_program_statuses(transport: NodeTransport) -> None:
    assert (await transport.run(["sh", "-c", "kill -TERM $$"])).exit_status == 143
    missing = await transport.run(["rbee-no-such-program", "x"])
    assert missing.exit_status == 127
    assert "not found" in missing.stderr


async def test_timeout_kills_the_command(transport: NodeTransport, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    sleeper = (
        "import os, sys, time; open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()));"
        " os.rename(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(120)"
    )
    with pytest.raises(RbeeError) as info:
        await transport.run([PY, "-c", sleeper, str(pid_file)], timeout=0.5)
    assert info.value.code == ErrorCode.REQUEST_TIMEOUT
    if pid_file.exists():  # on a busy machine the timeout may come before python got that far
        assert await gone(int(pid_file.read_text())), "the timed-out command is still running"


async def test_leaving_the_block_early_kills_the_command(transport: NodeTransport) -> None:
    with pytest.raises(RuntimeError, match="operator gave up"):
        async with transport.stream([PY, "-c", SLEEPER]) as proc:
            async for line in proc:
                pid = int(line)
                raise RuntimeError("operator gave up")
    assert await gone(pid)
    with pytest.raises(RbeeError) as info:
        await proc.wait()
    assert info.value.code == ErrorCode.REQUEST_CANCELED


async def test_stream_works_without_a_with_block(transport: NodeTransport) -> None:
    proc = transport.stream(["sh", "-c", "echo one; echo two; exit 4"])
    assert [line async for line in proc] == ["one", "two"]
    result = await proc.wait()
    assert (result.exit_status, result.stdout) == (4, "")
    unread = await transport.stream(["echo", "never iterated"]).wait()
    assert unread.stdout == "never iterated\n"


async def test_cancelling_the_task_kills_the_command(transport: NodeTransport) -> None:
    pids: list[int] = []

    async def follow() -> None:
        async with transport.stream([PY, "-c", SLEEPER]) as proc:
            async for line in proc:
                pids.append(int(line))

    task = asyncio.create_task(follow())
    while not pids:
        await asyncio.sleep(0.02)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await gone(pids[0])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_put_reports_progress_and_resumes(transport: NodeTransport, tmp_path: Path) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 12345))
    total = source.stat().st_size
    target = tmp_path / "remote" / "models" / "model.gguf.part"

    progress: list[tuple[int, int]] = []
    result = await transport.put(source, str(target), lambda done, tot: progress.append((done, tot)))
    assert (result.size, result.resumed_from) == (total, 0)
    assert progress[0] == (0, total) and progress[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(progress))
    assert sha256(target) == sha256(source)

    target.write_bytes(source.read_bytes()[: 1024 * 1024 + 7])
    progress.clear()
    resumed = await transport.put(source, str(target), lambda done, tot: progress.append((done, tot)))
    assert resumed.resumed_from == 1024 * 1024 + 7 and resumed.sent == total - resumed.resumed_from
    assert progress[0] == (resumed.resumed_from, total) and progress[-1] == (total, total)
    assert sha256(target) == sha256(source)

    target.write_bytes(os.urandom(total + 10))
    restarted = await transport.put(source, str(target))
    assert restarted.resumed_from == 0
    assert sha256(target) == sha256(source)

    target.write_bytes(b"x" * 100)
    fresh = await transport.put(source, str(target), resume=False)
    assert fresh.resumed_from == 0 and sha256(target) == sha256(source)


async def test_put_of_a_missing_file_is_a_clear_error(transport: NodeTransport, tmp_path: Path) -> None:
    with pytest.raises(RbeeError, match="cannot read"):
        await transport.put(tmp_path / "nope.gguf", str(tmp_path / "dst"))


async def test_unix_exchange_talks_to_a_socket_on_the_node(transport: NodeTransport, tmp_path: Path) -> None:
    """One streamlocal channel over SSH, a plain connection locally; `~/` is the node user's home."""
    path = tmp_path / "echo.sock"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"got " + request)
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(answer, str(path))
    try:
        reply = await transport.unix_exchange(str(path), b"ping\r\n\r\n")
        assert reply == b"got ping\r\n\r\n"
        # the same socket through the login directory: `~/` + a path relative to it
        relative = os.path.relpath(path, os.path.expanduser("~"))
        assert await transport.unix_exchange(f"~/{relative}", b"pong\r\n\r\n") == b"got pong\r\n\r\n"
        with pytest.raises(RbeeError) as too_much:
            await transport.unix_exchange(str(path), b"x" * 64 + b"\r\n\r\n", limit=16)
        assert (
            too_much.value.code == ErrorCode.INTERNAL_ERROR
            and "larger than 16 bytes" in too_much.value.message
        )
    finally:
        server.close()
        await server.wait_closed()
    with pytest.raises(RbeeError) as nobody:
        await transport.unix_exchange(str(path), b"ping\r\n\r\n")  # nobody listens there any more
    assert nobody.value.code == ErrorCode.HIVE_NOT_RUNNING and str(path) in nobody.value.message
