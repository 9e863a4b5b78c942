"""Reading YAML an operator wrote, defensively, with errors that point at a line and column.

Only ruamel's round-trip loader is used (it builds plain maps, lists and scalars
and keeps positions and comments). Before it runs, a pass over the parser events
refuses what an inventory never needs and an attacker loves: anchors and aliases
(billion-laughs bombs), explicit tags (`!!python/object…`), deep nesting and
multiple documents. Files over `MAX_BYTES` are not parsed at all.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    DocumentStartEvent,
    NodeEvent,
    ScalarEvent,
)
from ruamel.yaml.reader import ReaderError

from rbee_worker.protocol.errors import ErrorCode, RbeeError

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 32


def located_error(source: str, line0: int | None, col0: int | None, message: str) -> RbeeError:
    """INVENTORY_INVALID as `file:line:col: message` (1-based, like a compiler)."""
    where = source if line0 is None else f"{source}:{line0 + 1}:{(col0 or 0) + 1}"
    return RbeeError(
        ErrorCode.INVENTORY_INVALID,
        f"{where}: {message}",
        details={
            "file": source,
            "line": None if line0 is None else line0 + 1,
            "column": None if line0 is None else (col0 or 0) + 1,
        },
    )


def round_trip_yaml() -> YAML:
    """The one YAML configuration used to load and to dump inventories."""
    yaml = YAML(typ="rt")
    yaml.width = 4096
    yaml.allow_duplicate_keys = False
    return yaml


def read_source(path: Path, source: str) -> str:
    """The file's text, refusing oversize, unreadable or non-UTF-8 files with a located error."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise located_error(source, None, None, "file not found") from None
    except IsADirectoryError:
        raise located_error(source, None, None, "is a directory, not a file") from None
    except OSError as exc:
        raise located_error(source, None, None, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise located_error(
            source, None, None, f"file is larger than {MAX_BYTES // 1024} KiB; not an inventory"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line0 = data.count(b"\n", 0, exc.start)
        col0 = exc.start - (data.rfind(b"\n", 0, exc.start) + 1)
        raise located_error(source, line0, col0, "not valid UTF-8 text") from None


def parse_yaml(text: str, source: str) -> Any:
    """Round-trip load one YAML document after the safety pass; None for an empty file."""
    yaml = round_trip_yaml()
    try:
        _refuse_hostile(yaml, text, source)
        return yaml.load(text)
    except MarkedYAMLError as exc:
        raise _marked(exc, source) from None
    except ReaderError as exc:
        line0 = text.count("\n", 0, exc.position)
        col0 = exc.position - (text.rfind("\n", 0, exc.position) + 1)
        raise located_error(source, line0, col0, f"unacceptable character {exc.character!r}") from None
    except YAMLError as exc:
        raise located_error(source, None, None, f"invalid YAML: {exc}") from None


def _refuse_hostile(yaml: YAML, text: str, source: str) -> None:
    depth = 0
    documents = 0
    for event in yaml.parse(text):
        mark = event.start_mark
        if isinstance(event, AliasEvent):
            raise located_error(
                source,
                mark.line,
                mark.column,
                "aliases (*name) are not allowed in an inventory; write the values out",
            )
        if isinstance(event, NodeEvent) and event.anchor is not None:
            raise located_error(
                source,
                mark.line,
                mark.column,
                "anchors (&name) are not allowed in an inventory; write the values out",
            )
        if isinstance(event, ScalarEvent) and event.value == "<<" and event.style is None:
            raise located_error(
                source,
                mark.line,
                mark.column,
                "merge keys (<<) are not allowed in an inventory; write the keys out",
            )
        tag = getattr(event, "tag", None)
        if tag is not None:
            raise located_error(
                source, mark.line, mark.column, f"YAML tags ({tag}) are not allowed in an inventory"
            )
        if isinstance(event, DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise located_error(
                    source,
                    mark.line,
                    mark.column,
                    "more than one YAML document; an inventory is a single document",
                )
        if isinstance(event, CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise located_error(
                    source, mark.line, mark.column, f"nested deeper than {MAX_DEPTH} levels; not an inventory"
                )
        elif isinstance(event, CollectionEndEvent):
            depth -= 1


def _marked(exc: MarkedYAMLError, source: str) -> RbeeError:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "invalid YAML"
    if isinstance(exc, DuplicateKeyError):
        match = re.match(r'found duplicate key "(.*?)" with value', exc.problem or "")
        problem = f"duplicate key {match.group(1)!r}" if match else "duplicate key"
    elif exc.context and exc.problem:
        problem = f"{exc.problem} ({exc.context})"
    if mark is None:
        return located_error(source, None, None, problem)
    return located_error(source, mark.line, mark.column, problem)
