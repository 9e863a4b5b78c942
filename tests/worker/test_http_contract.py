"""Auth, validation and error bodies of the worker's HTTP API."""

from __future__ import annotations

import pytest

from ..worker_proc import WorkerProcess

PROTECTED = [
    ("GET", "/v1/ready"),
    ("GET", "/v1/loading/progress"),
    ("POST", "/v1/inference"),
    ("DELETE", "/v1/inference/abc"),
    ("POST", "/v1/admin/shutdown"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic Zm9vOmJhcg==", "bearer x"])
async def test_every_protected_route_wants_the_key(
    shared_tiny_worker: WorkerProcess, auth: str | None
) -> None:
    import httpx

    headers = {"Authorization": auth} if auth is not None else {}
    async with httpx.AsyncClient(base_url=shared_tiny_worker.url, headers=headers) as client:
        for method, path in PROTECTED:
            response = await client.request(method, path, json={"prompt": "x"})
            assert response.status_code == 401, (method, path)
            assert response.json()["error"]["code"] == "INVALID_API_KEY"
            assert response.headers["www-authenticate"] == "Bearer"
        health = await client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert shared_tiny_worker.proc.poll() is None, "a refused request must not stop the worker"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "top_k": -1}, "top_k"),
        ({"prompt": "x", "seed": -4}, "seed"),
        ({"prompt": "x", "stop": [1]}, "stop"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "bogus": 1}, "bogus"),
        ([1, 2], "body"),
    ],
)
async def test_invalid_bodies_name_the_field(
    shared_tiny_worker: WorkerProcess, body: object, field: str
) -> None:
    async with shared_tiny_worker.async_client() as client:
        response = await client.post("/v1/inference", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST"
    assert error["details"]["field"] == field
    assert error["message"].startswith(field)


async def test_malformed_and_oversized_bodies(shared_tiny_worker: WorkerProcess) -> None:
    async with shared_tiny_worker.async_client() as client:
        bad = await client.post(
            "/v1/inference", content=b"{not json", headers={"content-type": "application/json"}
        )
        huge = await client.post("/v1/inference", content=b"x" * (5 * 1024 * 1024))
        long_prompt = await client.post("/v1/inference", json={"prompt": "a" * 40000, "max_tokens": 2})
        ok = await client.post("/v1/inference", json={"prompt": "still fine", "max_tokens": 2})
    assert bad.status_code == 400 and bad.json()["error"]["details"]["field"] == "body"
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "INVALID_REQUEST"
    # A prompt longer than the context is reported in-stream as an error event, not a crash.
    assert "event: error" in long_prompt.text and "INVALID_REQUEST" in long_prompt.text
    assert "event: end" in ok.text


async def test_unknown_route_and_method(shared_tiny_worker: WorkerProcess) -> None:
    async with shared_tiny_worker.async_client() as client:
        missing = await client.get("/v1/nope")
        wrong = await client.get("/v1/inference")
        cancel_missing = await client.delete("/v1/inference/not-running")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "INVALID_REQUEST"
    assert cancel_missing.status_code == 404


async def test_request_id_is_the_workers_and_the_callers_is_only_echoed(
    shared_tiny_worker: WorkerProcess,
) -> None:
    """A caller's X-Request-ID names nothing it could cancel: the worker mints every id."""
    async with shared_tiny_worker.async_client() as client:
        response = await client.get("/v1/ready", headers={"X-Request-ID": "trace-42"})
        minted = await client.get("/v1/ready")
    assert response.headers["x-correlation-id"] == "trace-42"
    assert len(response.headers["x-request-id"]) == 32 and response.headers["x-request-id"] != "trace-42"
    assert len(minted.headers["x-request-id"]) == 32 and "x-correlation-id" not in minted.headers


async def test_cors_preflight_needs_no_key(shared_tiny_worker: WorkerProcess) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=shared_tiny_worker.url) as client:
        response = await client.options(
            "/v1/inference",
            headers={"Origin": "http://ui.local", "Access-Control-Request-Method": "POST"},
        )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in {"*", "http://ui.local"}


async def test_an_idle_keep_alive_connection_outlives_the_clients_own_expiry(
    shared_tiny_worker: WorkerProcess,
) -> None:
    """The worker keeps idle connections longer than httpx clients do (5 s), so the client always closes
    first and a request never races the server's close (uvicorn's default is also 5 s)."""
    import asyncio

    import httpx

    limits = httpx.Limits(keepalive_expiry=60)
    async with shared_tiny_worker.async_client(limits=limits) as client:
        first = await client.get("/v1/ready")
        address = first.extensions["network_stream"].get_extra_info("client_addr")
        await asyncio.sleep(6.5)
        second = await client.get("/v1/ready")
        again = second.extensions["network_stream"].get_extra_info("client_addr")
    assert first.status_code == second.status_code == 200
    assert again == address, "the same connection served both requests"
