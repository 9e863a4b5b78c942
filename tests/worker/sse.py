"""Read a worker's inference stream in tests with the project's own SSE parser."""

from __future__ import annotations

from typing import Any

import httpx

from rbee_worker.protocol.events import Event, iter_events


async def collect(client: httpx.AsyncClient, body: dict[str, Any], **kwargs: Any) -> list[Event]:
    async with client.stream("POST", "/v1/inference", json=body, **kwargs) as response:
        assert response.status_code == 200, await response.aread()
        return [event async for event in iter_events(response.aiter_bytes())]


def text_of(events: list[Event]) -> str:
    return "".join(e.data["t"] for e in events if e.name == "token")
