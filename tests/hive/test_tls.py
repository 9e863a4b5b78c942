"""Workers beyond loopback serve HTTPS with their hive's certificate; only a client that pinned it gets in.

`RBEE_HIVE_TLS=on` makes a loopback hive behave as one on a LAN address would.
"""

from __future__ import annotations

import asyncio
import ssl
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee_control.hive.tls import ensure_certificate, fingerprint, needs_tls, pinned_context
from rbee_worker.protocol.client import WorkerClient

from .conftest import Hive, cleanup, hive_env
from .servers import FileServer

PORTS = ("--port-min", "8750", "--port-max", "8799")


def test_which_addresses_get_tls() -> None:
    assert not needs_tls("127.0.0.1") and not needs_tls("127.0.0.9") and not needs_tls("::1")
    assert not needs_tls("localhost")
    assert needs_tls("192.168.1.20") and needs_tls("0.0.0.0") and needs_tls("mac.home.arpa")
    assert needs_tls("127.0.0.1", "on")


def test_a_hive_worker_serves_https_to_pinned_clients_only(
    tmp_path: Path, file_server: FileServer, tiny_model: Path
) -> None:
    hive = Hive(tmp_path / "home", {**hive_env(tmp_path, file_server), "RBEE_HIVE_TLS": "on"})
    hive.ok("models", "add", f"file:{tiny_model}", "--name", "tiny")
    hive.start(*PORTS)
    try:
        cert = hive.ok("tls")
        assert cert["fingerprint"] == fingerprint(cert["certificate"])
        assert stat.S_IMODE((hive.home / "tls" / "key.pem").stat().st_mode) == 0o600
        worker = hive.run("worker", "spawn", "--model", "tiny", "--ctx", "1024", "--wait").result
        assert worker["url"].startswith("https://127.0.0.1:")
        headers = {"Authorization": f"Bearer {worker['api_key']}"}
        body = {"prompt": "a bee", "max_tokens": 3}

        with httpx.Client(verify=pinned_context(cert["certificate"]), timeout=30) as pinned:
            answer = pinned.post(f"{worker['url']}/v1/inference", json=body, headers=headers)
        assert answer.status_code == 200 and b"event: end" in answer.content

        other = ensure_certificate(tmp_path / "other", ["127.0.0.1"])
        for verify in (pinned_context(other.pem), True):  # another pin, or the public CAs: refused
            with httpx.Client(verify=verify, timeout=10) as client, pytest.raises(httpx.ConnectError) as info:
                client.get(f"{worker['url']}/v1/ready", headers=headers)
            assert isinstance(
                info.value.__context__, ssl.SSLCertVerificationError
            ) or "CERTIFICATE_VERIFY_FAILED" in str(info.value)
        asyncio.run(_worker_client_pins(worker, cert["certificate"], other.pem))
        plain = worker["url"].replace("https://", "http://")
        with httpx.Client(timeout=10) as client, pytest.raises(httpx.HTTPError):
            client.get(f"{plain}/v1/ready", headers=headers)  # no key or prompt ever crosses in clear

        # the hive itself reaches its worker over TLS: a graceful stop is an HTTPS request
        assert hive.ok("worker", "stop", worker["id"])["how"] == "graceful"
    finally:
        cleanup(hive)


async def _worker_client_pins(worker: dict[str, Any], pem: str, other_pem: str) -> None:
    """`WorkerClient(verify=...)` carries the pin: the hive's certificate gets in, another does not."""
    async with WorkerClient(worker["url"], worker["api_key"], verify=pinned_context(pem)) as pinned:
        assert (await pinned.ready()).ok
    async with WorkerClient(worker["url"], worker["api_key"], verify=pinned_context(other_pem)) as wrong:
        with pytest.raises(httpx.ConnectError):
            await wrong.ready()
