"""Model names across nodes: one name for one file, `node/name` when files differ, pinning."""

from __future__ import annotations

import openai
import pytest

from rbee_control.queen import ModelEntry, WorkerEntry
from rbee_control.queen.catalog import public_models

from ..worker_proc import WorkerProcess
from .conftest import serve_queen


class ListedFleet:
    """A fleet whose catalogs hold `entries` and which starts nothing."""

    def __init__(self, entries: list[ModelEntry]) -> None:
        self.entries = entries

    async def list_models(self) -> list[ModelEntry]:
        return self.entries

    async def spawn(self, model: str, node: str) -> WorkerEntry:
        raise AssertionError("no cold start expected")

    async def stop_worker(self, entry: WorkerEntry) -> None:
        return None

    async def close(self) -> None:
        return None


def test_same_file_on_two_nodes_is_one_name_and_different_files_are_two() -> None:
    same = [ModelEntry("m", "a", digest="1"), ModelEntry("m", "b", digest="1"), ModelEntry("x", "b")]
    assert [(p.id, p.owned_by) for p in public_models(same)] == [("m", "a,b"), ("x", "b")]
    differ = [ModelEntry("m", "a", digest="1"), ModelEntry("m", "b", digest="2")]
    assert [(p.id, p.owned_by) for p in public_models(differ)] == [("a/m", "a"), ("b/m", "b")]


async def test_different_files_under_one_name_are_offered_and_routed_per_node(
    pair: dict[str, WorkerProcess],
) -> None:
    fleet = ListedFleet([ModelEntry("m", "n1", digest="aaa"), ModelEntry("m", "n2", digest="bbb")])
    async with serve_queen(fleet) as queen:
        await queen.register(pair["alpha"], "m", node="n1")
        await queen.register(pair["beta"], "m", node="n2")
        client = queen.openai()
        assert sorted(m.id for m in (await client.models.list()).data) == ["n1/m", "n2/m"]

        with pytest.raises(openai.NotFoundError) as caught:
            await client.completions.create(model="m", prompt="x", max_tokens=2)
        assert "n1/m" in caught.value.body["message"] and "n2/m" in caught.value.body["message"]

        sampling = {"prompt": "rbee", "max_tokens": 16, "temperature": 1.0, "seed": 5}
        answers = {}
        for node in ("n1", "n2", "n1"):
            result = await client.completions.create(model=f"{node}/m", **sampling)
            assert result.model == f"{node}/m"
            answers.setdefault(node, set()).add(result.choices[0].text)
        assert len(answers["n1"]) == 1 and answers["n1"] != answers["n2"]
        async with queen.admin() as http:
            served = {w["node"]: w["served"] for w in (await http.get("/v2/workers/list")).json()["workers"]}
        assert served == {"n1": 2, "n2": 1}
