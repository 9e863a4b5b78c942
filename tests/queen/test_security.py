"""Attacks on a real queen on loopback, each refused with the queen still answering.

A web page in the operator's browser (foreign Origin, `text/plain` bodies, a
rebinding Host), a client key on the admin plane, hostile registrations (a taken
id, a worker the queen started, an address outside the inventory, a full table),
and a client cancelling another client's request by guessing its id.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from rbee_control.queen import QueenSettings
from rbee_control.queen.access import HostPolicy, is_json
from rbee_control.queen.metrics import OTHER, QueenMetrics
from rbee_control.queen.registration import RegistrationPolicy
from rbee_worker.protocol.events import iter_events

from ..worker_proc import WorkerProcess
from .conftest import ADMIN_KEY, QUEEN_KEY, Queen, serve_queen
from .test_cold_start import ProcessFleet

EVIL = "http://evil.example"


async def _still_answers(queen: Queen) -> None:
    async with queen.http() as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/v1/models")).status_code == 200


@pytest.fixture
async def registered(queen: Queen, pair: dict[str, WorkerProcess]) -> Queen:
    await queen.register(pair["alpha"], "alpha", node="n1", id="w1")
    return queen


# -- the browser ---------------------------------------------------------------------------------


async def test_a_foreign_page_text_plain_post_is_415_without_cors_headers(queen: Queen) -> None:
    body = '{"model": "alpha", "prompt": "hi", "max_tokens": 4}'
    async with httpx.AsyncClient(base_url=queen.url, timeout=30) as browser:
        for path in ("/v1/completions", "/v2/workers/register"):
            response = await browser.post(
                path, content=body, headers={"Origin": EVIL, "Content-Type": "text/plain"}
            )
            assert response.status_code == 415, response.text
            assert response.json()["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
            assert not [h for h in response.headers if h.lower().startswith("access-control-")]
        # even with the key a non-JSON body is refused, and a preflight gets no CORS grant
        keyed = {"Origin": EVIL, "Content-Type": "text/plain", "Authorization": f"Bearer {QUEEN_KEY}"}
        assert (await browser.post("/v1/completions", content=body, headers=keyed)).status_code == 415
        preflight = await browser.options(
            "/v1/completions",
            headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers
    async with queen.admin() as admin:
        assert (await admin.get("/v2/workers/list")).json()["workers"] == []
    await _still_answers(queen)


async def test_cors_is_granted_only_to_an_allowed_origin() -> None:
    settings = QueenSettings(cors_origins=("http://app.example",))
    async with serve_queen(settings=settings) as queen, queen.http() as client:
        allowed = await client.get("/v1/models", headers={"Origin": "http://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "http://app.example"
        foreign = await client.get("/v1/models", headers={"Origin": EVIL})
        assert "access-control-allow-origin" not in foreign.headers


async def test_a_rebinding_host_is_400(queen: Queen) -> None:
    async with queen.http() as client:
        for host in ("evil.example", "evil.example:8080", "localhost.evil.example"):
            response = await client.get("/v1/models", headers={"Host": host})
            assert response.status_code == 400, host
            assert response.json()["error"]["param"] == "host"
        for host in ("localhost", "127.0.0.1:8080", "[::1]:8080"):
            assert (await client.get("/v1/models", headers={"Host": host})).status_code == 200, host
    await _still_answers(queen)


async def test_an_allowed_host_name_is_accepted() -> None:
    settings = QueenSettings(hosts=HostPolicy.for_bind("127.0.0.1", ["queen.home.arpa"]))
    async with serve_queen(settings=settings) as queen, queen.http() as client:
        assert (await client.get("/v1/models", headers={"Host": "queen.home.arpa:8080"})).status_code == 200
        assert (await client.get("/v1/models", headers={"Host": "evil.example"})).status_code == 400


def test_a_wildcard_bind_accepts_ip_literals_but_not_names() -> None:
    policy = HostPolicy.for_bind("0.0.0.0")
    assert policy.allows("192.168.1.20:8080") and policy.allows("localhost")
    assert not policy.allows("evil.example") and not policy.allows("0.0.0.0.evil.example")


def test_json_content_types() -> None:
    for accepted in (b"application/json", b"Application/JSON; charset=utf-8", b"application/patch+json"):
        assert is_json(accepted), accepted
    for refused in (None, b"", b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data"):
        assert not is_json(refused), refused


# -- two planes ------------------------------------------------------------------------------------


async def test_the_client_key_never_reaches_the_admin_plane(
    registered: Queen, pair: dict[str, WorkerProcess]
) -> None:
    body = {"url": pair["beta"].url, "api_key": pair["beta"].api_key, "model": "beta"}
    async with registered.http() as client:
        for method, path, kwargs in (
            ("POST", "/v2/workers/register", {"json": body}),
            ("GET", "/v2/workers/list", {}),
            ("DELETE", "/v2/workers/w1", {}),
        ):
            response = await client.request(method, path, **kwargs)
            assert response.status_code == 403, (path, response.text)
            assert response.json()["error"]["code"] == "FORBIDDEN"
    async with httpx.AsyncClient(base_url=registered.url, timeout=30) as nobody:
        assert (await nobody.get("/v2/workers/list")).status_code == 401
    async with registered.admin() as admin:
        listed = (await admin.get("/v2/workers/list")).json()["workers"]
        assert [w["id"] for w in listed] == ["w1"]
        # the operator's admin key also works on the client plane
        assert (await admin.get("/v1/models")).status_code == 200


# -- hostile registrations -------------------------------------------------------------------------


async def test_an_existing_id_is_not_taken_over(registered: Queen, pair: dict[str, WorkerProcess]) -> None:
    fake = pair["beta"]  # a worker the attacker controls, answering as "alpha"
    async with registered.admin() as admin:
        hijack = {"id": "w1", "url": fake.url, "api_key": fake.api_key, "model": "alpha"}
        response = await admin.post("/v2/workers/register", json=hijack)
        assert response.status_code == 409 and response.json()["error"]["code"] == "WORKER_EXISTS"
        # the same worker registering again is an update, not a conflict
        again = {"id": "w1", "url": pair["alpha"].url, "api_key": pair["alpha"].api_key, "model": "alpha"}
        assert (await admin.post("/v2/workers/register", json=again)).status_code == 201
        listed = (await admin.get("/v2/workers/list")).json()["workers"]
    assert [(w["id"], w["url"]) for w in listed] == [("w1", pair["alpha"].url)]
    completion = await registered.openai().completions.create(model="alpha", prompt="a", max_tokens=3)
    assert completion.choices[0].finish_reason == "length"


@pytest.mark.parametrize("name", ["../admin/shutdown?", "a b", "", "x" * 65, "é"])
async def test_ids_and_node_names_are_short_safe_words(
    queen: Queen, pair: dict[str, WorkerProcess], name: str
) -> None:
    worker = pair["alpha"]
    async with queen.admin() as admin:
        for field in ("id", "node"):
            body = {"url": worker.url, "api_key": worker.api_key, "model": "alpha", field: name}
            response = await admin.post("/v2/workers/register", json=body)
            assert response.status_code == 400 and response.json()["error"]["param"] == field
        assert (await admin.get("/v2/workers/list")).json()["workers"] == []


async def test_a_worker_the_queen_started_is_never_replaced(
    worker_factory: type[WorkerProcess], tiny_model: Path, pair: dict[str, WorkerProcess]
) -> None:
    fleet = ProcessFleet(tiny_model, worker_factory)
    async with serve_queen(fleet) as queen:
        client = queen.openai()
        await client.completions.create(model="cold", prompt="a", max_tokens=2)  # cold start: cold-1
        owned = fleet.workers[0]
        fake = pair["beta"]
        async with queen.admin() as admin:
            by_id = {"id": "cold-1", "url": fake.url, "api_key": fake.api_key, "model": "cold"}
            by_url = {"url": owned.url, "api_key": owned.api_key, "model": "cold", "node": "elsewhere"}
            for body in (by_id, by_url):
                response = await admin.post("/v2/workers/register", json=body)
                assert response.status_code == 409, response.text
            listed = (await admin.get("/v2/workers/list")).json()["workers"]
        assert [(w["id"], w["url"], w["owned"]) for w in listed] == [("cold-1", owned.url, True)]
        again = await client.completions.create(model="cold", prompt="a", max_tokens=2)
        assert again.choices[0].finish_reason == "length" and fleet.spawns == 1


class Listener:
    """A TCP port on another loopback address that counts who connects to it."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.sock.settimeout(0.2)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def outsider() -> Iterator[Listener]:
    listener = Listener("127.0.0.3")
    yield listener
    listener.close()


@pytest.fixture
async def inventory_queen() -> AsyncIterator[Queen]:
    """A queen whose inventory has one node, 127.0.0.2, and which does not bind loopback itself."""
    policy = RegistrationPolicy.build(["127.0.0.2"], allow_loopback=False)
    async with serve_queen(settings=QueenSettings(registration=policy)) as queen:
        yield queen


async def test_registration_probes_nothing_outside_the_inventory(
    inventory_queen: Queen, outsider: Listener
) -> None:
    async with inventory_queen.admin() as admin:
        for url in (outsider.url, "http://169.254.169.254", "http://localhost:9", "http://[::1]:9"):
            body = {"url": url, "api_key": "k", "model": "m"}
            response = await admin.post("/v2/workers/register", json=body)
            assert response.status_code == 403, (url, response.text)
            assert response.json()["error"]["code"] == "FORBIDDEN"
        # an inventory node's address is probed: nothing listens there, so it is a connect failure
        node = await admin.post("/v2/workers/register", json={"url": "http://127.0.0.2:9", "api_key": "k"})
        assert node.status_code == 502
        assert (await admin.get("/v2/workers/list")).json()["workers"] == []
    assert outsider.accepted == 0
    await _still_answers(inventory_queen)


async def test_a_register_network_admits_its_addresses(outsider: Listener) -> None:
    policy = RegistrationPolicy.build([], ["127.0.0.3/32"], allow_loopback=False)
    async with serve_queen(settings=QueenSettings(registration=policy)) as queen, queen.admin() as admin:
        response = await admin.post("/v2/workers/register", json={"url": outsider.url, "api_key": "k"})
    assert response.status_code == 502  # probed (and found not to be a worker)
    assert outsider.accepted >= 1


def test_a_bad_register_network_is_named() -> None:
    with pytest.raises(ValueError, match=r"10\.0\.0\.0/33"):
        RegistrationPolicy.build([], ["10.0.0.0/33"], allow_loopback=True)


async def test_the_table_is_capped(pair: dict[str, WorkerProcess]) -> None:
    policy = RegistrationPolicy(max_workers=1)
    async with serve_queen(settings=QueenSettings(registration=policy)) as queen:
        first = await queen.register(pair["alpha"], "alpha")
        async with queen.admin() as admin:
            body = {"url": pair["beta"].url, "api_key": pair["beta"].api_key, "model": "beta"}
            full = await admin.post("/v2/workers/register", json=body)
            assert full.status_code == 503 and full.json()["error"]["code"] == "TOO_MANY_WORKERS"
            assert "retry-after" in full.headers
            # re-registering a worker already in the table is still an update
            again = {"url": pair["alpha"].url, "api_key": pair["alpha"].api_key, "model": "alpha"}
            assert (await admin.post("/v2/workers/register", json=again)).json()["id"] == first["id"]
            assert len((await admin.get("/v2/workers/list")).json()["workers"]) == 1
        await _still_answers(queen)


def test_metric_labels_collapse_beyond_the_budget() -> None:
    metrics = QueenMetrics(max_series=3)
    for n in range(10):
        metrics.workers.labels(f"model-{n}", f"node-{n}").set(1)
        metrics.queue_depth.labels(f"model-{n}").set(1)
    text = metrics.render().decode()
    workers = [line for line in text.splitlines() if line.startswith("rbee_queen_workers{")]
    depth = [line for line in text.splitlines() if line.startswith("rbee_queen_queue_depth{")]
    assert len(workers) == 4 and len(depth) == 4  # three known, one `other`
    assert f'model="{OTHER}",node="{OTHER}"' in text
    metrics.workers.labels("model-0", "node-0").set(2)  # a known pair keeps its own series
    assert 'rbee_queen_workers{model="model-0",node="node-0"} 2.0' in metrics.render().decode()


# -- request ids -----------------------------------------------------------------------------------


async def test_a_client_chosen_request_id_cannot_cancel_another_clients_request(registered: Queen) -> None:
    body = {"model": "alpha", "prompt": "a", "max_tokens": 3000}
    headers = {"X-Request-ID": "victim"}
    async with (
        registered.http() as victim,
        registered.http() as attacker,
        registered.admin() as admin,
        victim.stream("POST", "/v1/inference", json=body, headers=headers) as response,
    ):
        queen_id = response.headers["x-request-id"]
        assert queen_id != "victim" and response.headers["x-correlation-id"] == "victim"
        events = []
        async for event in iter_events(response.aiter_bytes()):
            events.append(event)
            if event.name == "token" and len(events) == 2:
                assert (await attacker.delete("/v1/inference/victim")).status_code == 404
                # another key, even the admin's, cannot cancel it by its real id either
                assert (await admin.delete(f"/v1/inference/{queen_id}")).status_code == 403
    end = next(e for e in events if e.name == "end")
    assert end.data["stop_reason"] == "max_tokens" and end.data["tokens_out"] == 3000
    assert events[0].data["request_id"] == queen_id


async def test_an_unkeyed_queen_still_guards_its_admin_plane(pair: dict[str, WorkerProcess]) -> None:
    body = {"url": pair["alpha"].url, "api_key": pair["alpha"].api_key, "model": "alpha"}
    async with (
        serve_queen(api_key=None, admin_key=ADMIN_KEY) as queen,
        httpx.AsyncClient(base_url=queen.url, timeout=30) as anyone,
    ):
        assert (await anyone.get("/v1/models")).status_code == 200
        assert (await anyone.post("/v2/workers/register", json=body)).status_code == 401
