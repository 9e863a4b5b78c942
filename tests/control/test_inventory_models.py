"""The inventory's `models:` block: placement (node, split) and replicas, each mistake located."""

from __future__ import annotations

import pytest

from rbee_control.inventory.loader import parse_inventory
from rbee_control.inventory.placements import ModelPlacement
from rbee_worker.protocol.errors import RbeeError

NODES = "nodes:\n  a: {transport: local}\n  b: {transport: local}\n  c: {transport: local}\n"


def test_placements_and_their_defaults() -> None:
    inv = parse_inventory(
        NODES
        + "models:\n  tiny:\n    replicas: {min: 1, max: 3}\n  big:\n    node: a\n    split: [b, c]\n"
        + "  warm:\n    replicas: {min: 2}\n  plain:\n",
        "inv.yaml",
    )
    assert inv.placement("tiny") == ModelPlacement("tiny", None, (), 1, 3)
    assert inv.placement("big") == ModelPlacement("big", "a", ("b", "c"), 0, 1)
    assert inv.placement("warm") == ModelPlacement("warm", None, (), 2, 2)  # max follows a larger min
    assert inv.placement("plain") == ModelPlacement("plain")
    assert inv.placement("unlisted") == ModelPlacement("unlisted")


def test_a_source_says_where_a_node_without_the_model_fetches_it() -> None:
    digest = "ab" * 32
    inv = parse_inventory(
        NODES
        + f"models:\n  tiny:\n    source: http://127.0.0.1:9/tiny.gguf\n    sha256: {digest.upper()}\n"
        + "  hub:\n    source: hf:owner/repo:hub.Q4_K_M.gguf\n",
        "inv.yaml",
    )
    assert inv.placement("tiny").source == "http://127.0.0.1:9/tiny.gguf"
    assert inv.placement("tiny").sha256 == digest
    assert inv.placement("hub") == ModelPlacement("hub", source="hf:owner/repo:hub.Q4_K_M.gguf")


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("  t: {split: [zz]}", "inv.yaml:6:15: models.t.split[0]: unknown node 'zz'"),
        ("  t: {split: [b, b]}", "models.t.split[1]: node 'b' listed twice"),
        ("  t: {split: []}", "models.t.split: expected a non-empty list of node names"),
        ("  t: {node: x}", "models.t.node: unknown node 'x'"),
        ("  t: {replicas: {min: 3, max: 2}}", "models.t.replicas: expected 0 <= min <= max and max >= 1"),
        ("  t: {replicas: {max: 0}}", "expected 0 <= min <= max and max >= 1, got 0..0"),
        ("  t: {replicas: {min: -1}}", "models.t.replicas.min: expected an integer >= 0"),
        ("  t: {replicas: {max: two}}", "models.t.replicas.max: expected an integer >= 0"),
        ("  t: {replica: 1}", "models.t.replica: unknown key; did you mean 'replicas'?"),
        ("  t: {split: [b], replicas: {max: 2}}", "a split model runs as one worker: max must be 1"),
        ("  ../x: {}", "invalid model name '../x'"),
        (
            "  t: {source: 'file:/m/t.gguf'}",
            "models.t.source: expected hf:owner/repo:file.gguf or an http(s)",
        ),
        ("  t: {source: 'http://mirror/t.gguf'}", "an http:// source needs sha256:"),
        ("  t: {source: 'hf:o/r:t.gguf', sha256: abc}", "inv.yaml:6:40: models.t.sha256: expected 64 hex"),
    ],
)
def test_mistakes_are_located(block: str, message: str) -> None:
    with pytest.raises(RbeeError) as err:
        parse_inventory(NODES + "models:\n" + block + "\n", "inv.yaml")
    assert message in err.value.message, err.value.message
