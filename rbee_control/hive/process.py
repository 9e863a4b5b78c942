"""Signalling and waiting for processes the hive started, safe against pid reuse.

A pid alone is not an identity: after a crash or a reboot the number may belong to
someone else's process. Every record the hive keeps pairs the pid with the
process's start time, and nothing is signalled unless both still match.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil

_CREATE_TIME_SLACK = 1.0


def create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def is_alive(pid: int, started: float | None = None) -> bool:
    """True if `pid` runs, is not a zombie, and (when known) started at `started`."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < _CREATE_TIME_SLACK
    except psutil.Error:
        return False


def send(pid: int, sig: signal.Signals, started: float | None = None) -> bool:
    """Signal the process group `pid` leads (workers run in their own session), else the pid."""
    if not is_alive(pid, started):
        return False
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def wait_gone(pid: int, started: float | None, timeout: float, poll: float = 0.05) -> bool:
    """Wait up to `timeout` s for the process to exit; True if it did."""
    deadline = time.monotonic() + timeout
    while is_alive(pid, started):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll)
    return True


async def terminate(pid: int, started: float | None, term_grace: float = 5.0) -> str:
    """SIGTERM, then SIGKILL after `term_grace` s; say which one it took."""
    if not send(pid, signal.SIGTERM, started):
        return "exited"
    if await wait_gone(pid, started, term_grace):
        return "terminated"
    send(pid, signal.SIGKILL, started)
    await wait_gone(pid, started, 5.0)
    return "killed"
