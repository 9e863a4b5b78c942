"""Load and validate `inventory.yaml` into an `Inventory`, or say exactly where it is wrong.

Every error is INVENTORY_INVALID with `file:line:col: dotted.path: what was expected`,
so an editor can jump to it; unknown keys get a did-you-mean because a typo in a
key would otherwise silently fall back to a default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from rbee_control.inventory.model import (
    KNOWN_BACKENDS,
    NODE_NAME_RE,
    TRANSPORTS,
    Defaults,
    Inventory,
    Node,
    SshSettings,
    Transport,
)
from rbee_control.inventory.paths import default_inventory_path
from rbee_control.inventory.placements import (
    DEFAULT_MAX_REPLICAS,
    DEFAULT_MIN_REPLICAS,
    MODEL_KEYS,
    MODEL_NAME_RE,
    REPLICA_KEYS,
    SHA256_RE,
    ModelPlacement,
    source_problem,
)
from rbee_control.inventory.suggest import did_you_mean
from rbee_control.inventory.upstreams import UPSTREAM_KEYS, Upstream, check_models, check_name, check_url
from rbee_control.inventory.yaml_source import located_error, parse_yaml, read_source
from rbee_worker.protocol.errors import ErrorCode, RbeeError

Pos = tuple[int, int] | None

TOP_KEYS = ("defaults", "nodes", "upstreams", "models")
DEFAULT_KEYS = ("ssh_user", "ssh_port", "ssh_key", "models_dir", "home", "python", "backends")
NODE_KEYS = ("transport", "ssh", "address", "home", "python", "backends", "labels", "models_dir")
SSH_KEYS = ("host", "port", "user", "key")
INVENTORY_ENV = "RBEE_INVENTORY"


def load_inventory(path: str | os.PathLike[str]) -> Inventory:
    """Read, parse and validate the inventory at `path` (named in errors as given)."""
    source = os.fspath(path)
    text = read_source(Path(source), source)
    return parse_inventory(text, source, Path(source))


def parse_inventory(text: str, source: str, path: Path | None = None) -> Inventory:
    """Validate inventory text; `source` is the name errors carry."""
    return _Checker(source).inventory(parse_yaml(text, source), path)


def find_inventory(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`--inventory`, then `$RBEE_INVENTORY`, then the per-user one.

    An explicit path (flag or variable) must exist: silently falling through to
    another inventory would drive the wrong machines. The current directory is
    never searched: an `inventory.yaml` in a cloned repository or a download
    folder would otherwise choose which machines the keeper logs into.
    """
    if explicit:
        return _must_exist(Path(explicit), "--inventory")
    env = os.environ.get(INVENTORY_ENV)
    if env:
        return _must_exist(Path(env), f"${INVENTORY_ENV}")
    candidates = [default_inventory_path()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise RbeeError(
        ErrorCode.INVENTORY_INVALID,
        f"no inventory found (looked at --inventory, ${INVENTORY_ENV}, {looked})",
        status=404,
        details={"looked": [str(c) for c in candidates]},
        hint="create one with rbee-keeper setup add-node, or point --inventory / $RBEE_INVENTORY at one",
    )


def _must_exist(path: Path, origin: str) -> Path:
    if not path.is_file():
        raise RbeeError(
            ErrorCode.INVENTORY_INVALID,
            f"inventory {path} (from {origin}) does not exist",
            status=404,
            details={"path": str(path)},
        )
    return path


def _key_pos(mapping: Any, key: Any) -> Pos:
    try:
        return tuple(mapping.lc.key(key))
    except (AttributeError, KeyError, TypeError):
        return _pos(mapping)


def _value_pos(mapping: Any, key: Any) -> Pos:
    try:
        return tuple(mapping.lc.value(key))
    except (AttributeError, KeyError, TypeError):
        return _key_pos(mapping, key)


def _item_pos(seq: Any, index: int, fallback: Pos) -> Pos:
    try:
        return tuple(seq.lc.item(index))
    except (AttributeError, KeyError, TypeError):
        return fallback


def _pos(node: Any) -> Pos:
    lc = getattr(node, "lc", None)
    return (lc.line, lc.col) if lc is not None and lc.line is not None else None


class _Checker:
    """One validation pass; knows the file name so every failure is located."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, pos: Pos, path: str, message: str) -> NoReturn:
        line, col = pos if pos is not None else (None, None)
        raise located_error(self.source, line, col, f"{path}: {message}" if path else message)

    # -- structure ------------------------------------------------------------------

    def mapping(self, value: Any, path: str, pos: Pos, allowed: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(pos, path, "expected a mapping")
        for key in value:
            key_pos = _key_pos(value, key)
            if not isinstance(key, str):
                self.fail(key_pos, path, f"keys must be strings, got {key!r}")
            if key not in allowed:
                hint = did_you_mean(key, allowed) or f" (expected one of: {', '.join(allowed)})"
                self.fail(key_pos, _join(path, key), f"unknown key{hint}")
        return value

    def inventory(self, doc: Any, path: Path | None) -> Inventory:
        if doc is None:
            return Inventory(nodes={}, path=path)
        top = self.mapping(doc, "", (0, 0), TOP_KEYS)
        defaults = Defaults()
        if top.get("defaults") is not None:
            defaults = self.defaults(top["defaults"], _value_pos(top, "defaults"))
        nodes: dict[str, Node] = {}
        raw_nodes = top.get("nodes")
        if raw_nodes is not None:
            if not isinstance(raw_nodes, Mapping):
                self.fail(_value_pos(top, "nodes"), "nodes", "expected a mapping of node names to nodes")
            for name in raw_nodes:
                nodes[name] = self.node(raw_nodes, name, defaults)
        models: dict[str, ModelPlacement] = {}
        raw_models = top.get("models")
        if raw_models is not None:
            if not isinstance(raw_models, Mapping):
                self.fail(
                    _value_pos(top, "models"), "models", "expected a mapping of model names to placements"
                )
            for name in raw_models:
                models[name] = self.model(raw_models, name, nodes)

        upstreams: dict[str, Upstream] = {}
        if top.get("upstreams") is not None:
            upstreams = self.upstreams(top["upstreams"], _value_pos(top, "upstreams"), nodes)
        return Inventory(nodes=nodes, defaults=defaults, path=path, upstreams=upstreams, models=models)

    def model(self, models: Mapping[str, Any], name: Any, nodes: Mapping[str, Node]) -> ModelPlacement:
        dotted = f"models.{name}"
        if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
            self.fail(_key_pos(models, name), "models", f"invalid model name {name!r}")
        raw = models[name]
        block = self.mapping({} if raw is None else raw, dotted, _value_pos(models, name), MODEL_KEYS)

        def known_node(value: Any, pos: Pos, where: str) -> str:
            text = self.string(value, pos, where)
            if text not in nodes:
                hint = did_you_mean(text, list(nodes))
                self.fail(pos, where, f"unknown node {text!r} (nodes: {', '.join(nodes) or 'none'}){hint}")
            return text

        node = None
        if block.get("node") is not None:
            node = known_node(block["node"], _value_pos(block, "node"), f"{dotted}.node")
        split: list[str] = []
        if block.get("split") is not None:
            raw_split, pos = block["split"], _value_pos(block, "split")
            if not isinstance(raw_split, list) or not raw_split:
                self.fail(pos, f"{dotted}.split", "expected a non-empty list of node names")
            for index, item in enumerate(raw_split):
                where = f"{dotted}.split[{index}]"
                helper = known_node(item, _item_pos(raw_split, index, pos), where)
                if helper in split:
                    self.fail(_item_pos(raw_split, index, pos), where, f"node {helper!r} listed twice")
                split.append(helper)
        low, high = DEFAULT_MIN_REPLICAS, DEFAULT_MAX_REPLICAS
        if block.get("replicas") is not None:
            rpos = _value_pos(block, "replicas")
            replicas = self.mapping(block["replicas"], f"{dotted}.replicas", rpos, REPLICA_KEYS)
            for key in replicas:
                value = replicas[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    self.fail(
                        _value_pos(replicas, key), f"{dotted}.replicas.{key}", "expected an integer >= 0"
                    )
            low, high = replicas.get("min", low), replicas.get("max", max(1, replicas.get("min", high)))
            if high < 1 or low > high:
                self.fail(
                    rpos, f"{dotted}.replicas", f"expected 0 <= min <= max and max >= 1, got {low}..{high}"
                )
            if split and high > 1:
                self.fail(rpos, f"{dotted}.replicas", "a split model runs as one worker: max must be 1")
        source = sha256 = None
        if block.get("sha256") is not None:
            sha256 = self.string(block["sha256"], _value_pos(block, "sha256"), f"{dotted}.sha256").lower()
            if not SHA256_RE.fullmatch(sha256):
                self.fail(_value_pos(block, "sha256"), f"{dotted}.sha256", "expected 64 hex digits")
        if block.get("source") is not None:
            source = self.string(block["source"], _value_pos(block, "source"), f"{dotted}.source")
            problem = source_problem(source, sha256)
            if problem:
                self.fail(_value_pos(block, "source"), f"{dotted}.source", problem)
        return ModelPlacement(name, node, tuple(split), low, high, source, sha256)

    def upstreams(self, raw: Any, pos: Pos, nodes: Mapping[str, Node]) -> dict[str, Upstream]:
        if not isinstance(raw, Mapping):
            self.fail(pos, "upstreams", "expected a mapping of names to {url: http://host:port/v1}")
        return {name: self.upstream(raw, name, nodes) for name in raw}

    def upstream(self, raw: Mapping[str, Any], name: Any, nodes: Mapping[str, Node]) -> Upstream:
        name_pos, dotted = _key_pos(raw, name), f"upstreams.{name}"
        check_name(name, lambda message: self.fail(name_pos, "upstreams", message))
        if name in nodes:  # `name/model` pins either a node or an upstream, never both
            self.fail(name_pos, dotted, f"{name!r} is also a node's name; give the upstream another")
        block = self.mapping(raw[name], dotted, _value_pos(raw, name), UPSTREAM_KEYS)
        if "url" not in block:
            self.fail(name_pos, dotted, "missing required key 'url' (like http://10.0.0.5:8000/v1)")
        url_pos = _value_pos(block, "url")
        text = self.string(block["url"], url_pos, f"{dotted}.url")
        url = check_url(text, lambda message: self.fail(url_pos, f"{dotted}.url", message))
        if "models" not in block:
            return Upstream(name=name, url=url)
        value, where = block["models"], _value_pos(block, "models")

        def fail_at(index: int | None, message: str) -> None:
            at = where if index is None else _item_pos(value, index, where)
            self.fail(at, f"{dotted}.models" + ("" if index is None else f"[{index}]"), message)

        return Upstream(name=name, url=url, models=check_models(value, fail_at))

    def defaults(self, raw: Any, pos: Pos) -> Defaults:
        block = self.mapping(raw, "defaults", pos, DEFAULT_KEYS)
        out: dict[str, Any] = {}
        for key in block:
            value, where, dotted = block[key], _value_pos(block, key), f"defaults.{key}"
            if key == "ssh_port":
                out[key] = self.port(value, where, dotted)
            elif key == "backends":
                out[key] = self.backends(value, where, dotted)
            elif key == "home":
                out[key] = self.node_path(value, where, dotted)
            else:
                out[key] = self.string(value, where, dotted)
        return Defaults(**out)

    def node(self, nodes: Mapping[str, Any], name: Any, defaults: Defaults) -> Node:
        name_pos = _key_pos(nodes, name)
        if not isinstance(name, str) or not NODE_NAME_RE.fullmatch(name):
            self.fail(
                name_pos, "nodes", f"invalid node name {name!r}: use 1–64 letters, digits, '.', '_' or '-'"
            )
        dotted = f"nodes.{name}"
        block = self.mapping(nodes[name], dotted, _value_pos(nodes, name), NODE_KEYS)

        def field_pos(key: str) -> Pos:
            return _value_pos(block, key)

        transport = self.transport(block, dotted, name_pos)
        ssh = None
        if transport == "ssh":
            ssh = self.ssh(block["ssh"], field_pos("ssh"), f"{dotted}.ssh", _key_pos(block, "ssh"), defaults)
        elif "ssh" in block:
            self.fail(
                _key_pos(block, "ssh"),
                f"{dotted}.ssh",
                "only used with transport: ssh; remove it or set transport: ssh",
            )
        address = "127.0.0.1" if ssh is None else ssh.host
        if "address" in block:
            address = self.host(block["address"], field_pos("address"), f"{dotted}.address")
        home = defaults.home
        if "home" in block:
            home = self.node_path(block["home"], field_pos("home"), f"{dotted}.home")
        models_dir = defaults.models_dir
        if "models_dir" in block:
            models_dir = self.node_path(block["models_dir"], field_pos("models_dir"), f"{dotted}.models_dir")
        python = defaults.python
        if "python" in block:
            python = self.string(block["python"], field_pos("python"), f"{dotted}.python")
        backends = defaults.backends
        if "backends" in block:
            backends = self.backends(block["backends"], field_pos("backends"), f"{dotted}.backends")
        labels: dict[str, str] = {}
        if "labels" in block:
            labels = self.labels(block["labels"], field_pos("labels"), f"{dotted}.labels")
        return Node(
            name=name,
            transport=transport,
            address=address,
            home=home,
            python=python,
            backends=backends,
            ssh=ssh,
            labels=labels,
            models_dir=models_dir,
        )

    def transport(self, block: Mapping[str, Any], dotted: str, name_pos: Pos) -> Transport:
        if "transport" not in block:
            if "ssh" in block:
                return "ssh"
            self.fail(name_pos, dotted, "no 'ssh' block; add ssh: {host: …} or set transport: local")
        value = block["transport"]
        if value not in TRANSPORTS:
            hint = did_you_mean(str(value), TRANSPORTS) if isinstance(value, str) else ""
            self.fail(
                _value_pos(block, "transport"), f"{dotted}.transport", f"expected 'local' or 'ssh'{hint}"
            )
        if value == "ssh" and "ssh" not in block:
            self.fail(_key_pos(block, "transport"), dotted, "transport ssh needs an 'ssh' block with a host")
        return "local" if value == "local" else "ssh"

    def ssh(self, raw: Any, pos: Pos, dotted: str, key_pos: Pos, defaults: Defaults) -> SshSettings:
        block = self.mapping(raw, dotted, pos, SSH_KEYS)
        if "host" not in block:
            self.fail(key_pos, dotted, "missing required key 'host'")
        host = self.host(block["host"], _value_pos(block, "host"), f"{dotted}.host")
        port = defaults.ssh_port
        if "port" in block:
            port = self.port(block["port"], _value_pos(block, "port"), f"{dotted}.port")
        user = defaults.ssh_user
        if "user" in block:
            user = self.string(block["user"], _value_pos(block, "user"), f"{dotted}.user")
        key = defaults.ssh_key
        if "key" in block:
            key = self.string(block["key"], _value_pos(block, "key"), f"{dotted}.key")
        return SshSettings(host=host, port=port, user=user, key=key)

    # -- scalars --------------------------------------------------------------------

    def string(self, value: Any, pos: Pos, dotted: str) -> str:
        if not isinstance(value, str):
            self.fail(pos, dotted, "expected a string" + (" (quote it)" if value is not None else ""))
        if not value.strip():
            self.fail(pos, dotted, "must not be empty")
        return str(value)

    def host(self, value: Any, pos: Pos, dotted: str) -> str:
        text = self.string(value, pos, dotted)
        if any(ch.isspace() for ch in text) or "/" in text or text.startswith("-"):
            self.fail(pos, dotted, "expected a host name or IP address (no scheme, path or spaces)")
        return text

    def port(self, value: Any, pos: Pos, dotted: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.fail(pos, dotted, "expected an integer 1–65535")
        return int(value)

    def node_path(self, value: Any, pos: Pos, dotted: str) -> str:
        text = self.string(value, pos, dotted)
        if not (text.startswith("/") or text == "~" or text.startswith("~/")):
            self.fail(pos, dotted, "expected an absolute path or one starting with ~/")
        return text

    def backends(self, value: Any, pos: Pos, dotted: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            self.fail(pos, dotted, f"expected a non-empty list of backends ({', '.join(KNOWN_BACKENDS)})")
        seen: list[str] = []
        for index, item in enumerate(value):
            where = _item_pos(value, index, pos)
            if item not in KNOWN_BACKENDS:
                hint = did_you_mean(item, KNOWN_BACKENDS) if isinstance(item, str) else ""
                self.fail(
                    where,
                    f"{dotted}[{index}]",
                    f"unknown backend {item!r} (expected one of: {', '.join(KNOWN_BACKENDS)}){hint}",
                )
            if item in seen:
                self.fail(where, f"{dotted}[{index}]", f"backend {item!r} listed twice")
            seen.append(str(item))
        return tuple(seen)

    def labels(self, value: Any, pos: Pos, dotted: str) -> dict[str, str]:
        if not isinstance(value, Mapping):
            self.fail(pos, dotted, "expected a mapping of label names to values")
        out: dict[str, str] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.fail(_key_pos(value, key), dotted, f"label names must be strings, got {key!r}")
            if isinstance(item, bool):
                out[key] = "true" if item else "false"
            elif isinstance(item, str | int | float):
                out[key] = str(item)
            else:
                self.fail(_value_pos(value, key), f"{dotted}.{key}", "expected a string, number or boolean")
        return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
