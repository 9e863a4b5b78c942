"""`setup add-node` / `remove-node`: change one node and leave every other byte alone.

The inventory is the operator's file, with their comments and layout, so an edit
splices text: the new node's lines go after the last node, a removed node's lines
(with the comment block right above it) are cut out. ruamel supplies positions and
renders the new node in the file's own indentation. The result is re-parsed and
must equal the intended change and pass full validation before it replaces the
file atomically; when the layout is too unusual to splice (flow-style `nodes`,
no `nodes` yet) ruamel's round-trip dump is used instead, still keeping comments.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from rbee_control.inventory.atomic import atomic_write
from rbee_control.inventory.loader import parse_inventory
from rbee_control.inventory.model import Inventory, check_node_name, unknown_node
from rbee_control.inventory.yaml_source import parse_yaml, read_source, round_trip_yaml
from rbee_worker.protocol.errors import ErrorCode, RbeeError

Lines = list[str]


def add_node(path: str | os.PathLike[str], name: str, node_fields: Mapping[str, Any]) -> Inventory:
    """Append node `name` (fields as in the YAML, None values dropped); create the file if missing."""
    check_node_name(name)
    fields = _plain_fields(node_fields)
    source, original, doc = _open(path)
    current = parse_inventory(original, source)
    if name in current.nodes:
        raise RbeeError(
            ErrorCode.INVALID_REQUEST,
            f"node {name!r} already exists in {source}",
            status=409,
            details={"node": name},
            hint=f"to replace it: rbee-keeper setup remove-node {name}, then add it again",
        )
    expected = _plain(doc) or {}
    expected["nodes"] = {**(expected.get("nodes") or {}), name: fields}
    text = _splice_add(original, doc, name, fields)
    return _commit(path, source, original, expected, text, lambda d: _dump_add(d, name, fields))


def remove_node(path: str | os.PathLike[str], name: str) -> Inventory:
    """Drop node `name` and the comment block directly above it."""
    source, original, doc = _open(path)
    current = parse_inventory(original, source)
    if name not in current.nodes:
        raise unknown_node(name, current.names())
    expected = _plain(doc)
    del expected["nodes"][name]
    text = _splice_remove(original, doc, name)
    return _commit(path, source, original, expected, text, lambda d: _dump_remove(d, name))


def _open(path: str | os.PathLike[str]) -> tuple[str, str, Any]:
    source = os.fspath(path)
    original = read_source(Path(source), source) if Path(source).exists() else ""
    return source, original, parse_yaml(original, source)


def _commit(
    path: str | os.PathLike[str],
    source: str,
    original: str,
    expected: dict[str, Any],
    spliced: str | None,
    dump: Callable[[Any], str],
) -> Inventory:
    """Pick the spliced text if it parses to exactly `expected`, else the dump; validate; write."""
    text = spliced if spliced is not None and _means(spliced, source, expected) else None
    if text is None:
        text = dump(parse_yaml(original, source))
        if not _means(text, source, expected):
            raise RbeeError(
                ErrorCode.INTERNAL_ERROR, f"could not edit {source} safely; it was left unchanged"
            )
    inventory = parse_inventory(text, source, Path(source))
    atomic_write(Path(source), text.encode("utf-8"))
    return inventory


def _means(text: str, source: str, expected: dict[str, Any]) -> bool:
    try:
        return _plain(parse_yaml(text, source)) == expected
    except RbeeError:
        return False


# -- splicing -------------------------------------------------------------------------


def _split(text: str) -> Lines:
    """Lines with their endings, split only on '\\n' (the breaks ruamel counts)."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    return [*lines, parts[-1]] if parts[-1] else lines


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_nodes(doc: Any) -> CommentedMap | None:
    nodes = doc.get("nodes") if isinstance(doc, CommentedMap) else None
    if not isinstance(nodes, CommentedMap) or not nodes or nodes.fa.flow_style():
        return None
    columns = {nodes.lc.key(key)[1] for key in nodes}
    return nodes if len(columns) == 1 else None


def _block_end(lines: Lines, key_line: int, key_col: int) -> int:
    """Index of the last line belonging to the node whose key is on `key_line`."""
    last = key_line
    for index in range(key_line + 1, len(lines)):
        stripped = lines[index].strip()
        if not stripped:
            continue
        if _indent(lines[index]) <= key_col:
            if stripped.startswith("#"):
                continue
            break
        last = index
    return last


def _block_start(lines: Lines, key_line: int, key_col: int, floor: int) -> int:
    """First line of the node: its key, or the comment lines right above it at the same indentation."""
    start = key_line
    while start - 1 > floor:
        line = lines[start - 1]
        if line.strip().startswith("#") and _indent(line) == key_col:
            start -= 1
        else:
            break
    return start


def _splice_add(original: str, doc: Any, name: str, fields: dict[str, Any]) -> str | None:
    nodes = _block_nodes(doc)
    if nodes is None:
        return None
    lines = _split(original)
    newline = "\r\n" if original.endswith("\r\n") or "\r\n" in original else "\n"
    keys = list(nodes)
    key_line, key_col = nodes.lc.key(keys[-1])
    end = _block_end(lines, key_line, key_col)
    if not lines[end].endswith("\n"):
        lines[end] += newline
    block = _render_node(name, fields, key_col, _inner_indent(nodes, key_col))
    new_lines = [line.rstrip("\n") + newline for line in block.splitlines()]
    if len(keys) > 1:
        start = _block_start(lines, key_line, key_col, nodes.lc.key(keys[-2])[0])
        if start > 0 and not lines[start - 1].strip():
            new_lines.insert(0, newline)
    return "".join(lines[: end + 1] + new_lines + lines[end + 1 :])


def _splice_remove(original: str, doc: Any, name: str) -> str | None:
    nodes = _block_nodes(doc)
    if nodes is None:
        return None
    lines = _split(original)
    keys = list(nodes)
    index = keys.index(name)
    key_line, key_col = nodes.lc.key(name)
    floor = nodes.lc.key(keys[index - 1])[0] if index > 0 else doc.lc.key("nodes")[0]
    start = _block_start(lines, key_line, key_col, floor)
    end = _block_end(lines, key_line, key_col) + 1
    if end < len(lines) and not lines[end].strip():
        while end < len(lines) and not lines[end].strip():
            end += 1
    elif start > 0 and not lines[start - 1].strip() and start - 1 > floor:
        while start - 1 > floor and not lines[start - 1].strip():
            start -= 1
    kept = lines[:start] + lines[end:]
    if len(keys) == 1 and not _mark_empty_nodes(kept, doc):
        return None
    return "".join(kept)


def _mark_empty_nodes(lines: Lines, doc: Any) -> bool:
    """Turn `nodes:` into `nodes: {}` once its last node is gone (instead of a null)."""
    line_no, col = doc.lc.key("nodes")
    line = lines[line_no]
    if line[col : col + 6] != "nodes:":
        return False
    lines[line_no] = line[: col + 6] + " {}" + line[col + 6 :]
    return True


def _inner_indent(nodes: CommentedMap, key_col: int) -> int:
    """How far the file indents a node's fields under its name (2 if no node shows it)."""
    for key in nodes:
        value = nodes[key]
        if isinstance(value, CommentedMap) and value and not value.fa.flow_style():
            step = value.lc.key(next(iter(value)))[1] - key_col
            if step > 0:
                return step
    return 2


def _render_node(name: str, fields: dict[str, Any], key_col: int, step: int) -> str:
    """`name:` with one field per line; nested values in flow style, as in the design's example."""
    body = CommentedMap()
    for key, value in fields.items():
        body[key] = _flow(value)
    body.fa.set_block_style()
    root = CommentedMap({name: body})
    yaml = round_trip_yaml()
    yaml.indent(mapping=step, sequence=step, offset=0)
    out = io.StringIO()
    yaml.dump(root, out)
    pad = " " * key_col
    return "".join(pad + line + "\n" for line in out.getvalue().splitlines())


def _flow(value: Any) -> Any:
    if isinstance(value, dict):
        out = CommentedMap((k, _flow(v)) for k, v in value.items())
        out.fa.set_flow_style()
        return out
    if isinstance(value, list):
        seq = CommentedSeq(_flow(v) for v in value)
        seq.fa.set_flow_style()
        return seq
    return value


# -- fallback: whole-document round trip ----------------------------------------------


def _dump(doc: Any) -> str:
    out = io.StringIO()
    round_trip_yaml().dump(doc, out)
    return out.getvalue()


def _dump_add(doc: Any, name: str, fields: dict[str, Any]) -> str:
    if not isinstance(doc, CommentedMap):
        doc = CommentedMap()
    nodes = doc.get("nodes")
    if not isinstance(nodes, CommentedMap):
        nodes = CommentedMap()
        doc["nodes"] = nodes
    body = CommentedMap((k, _flow(v)) for k, v in fields.items())
    body.fa.set_block_style()
    nodes[name] = body
    if len(nodes) == 1:
        nodes.fa.set_block_style()
    return _dump(doc)


def _dump_remove(doc: Any, name: str) -> str:
    del doc["nodes"][name]
    return _dump(doc)


# -- plain values ---------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """ruamel's commented containers as dicts/lists, for comparing meaning rather than text."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def _plain_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Copy the caller's fields as YAML-able plain data, dropping None values."""

    def clean(value: Any, where: str) -> Any:
        if isinstance(value, Mapping):
            return {str(k): clean(v, f"{where}.{k}") for k, v in value.items() if v is not None}
        if isinstance(value, list | tuple):
            return [clean(v, where) for v in value]
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, str | int | float | bool):
            return value
        raise RbeeError(ErrorCode.INVALID_REQUEST, f"{where}: cannot store a {type(value).__name__} in YAML")

    return clean(dict(fields), "node")
