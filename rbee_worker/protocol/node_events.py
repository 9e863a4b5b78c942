"""The JSON-lines format node commands speak on stdout, for producer and consumer alike.

The keeper runs `rbee-hive <subcommand> --json` on a node (over SSH or as a local
subprocess) and reads its stdout line by line: any number of `progress` and `log`
events, then exactly one `result` or `error`. Defining both the writer and the
parser here keeps the two ends of the pipe from drifting apart.

    {"event": "progress", "phase": "download", "bytes": 1048576, "total": 4194304, "speed": 2.1e7}
    {"event": "log", "message": "resuming at 1.0 MB"}
    {"event": "result", "name": "tiny", "cached": false, ...}
    {"event": "error", "code": "DOWNLOAD_FAILED", "message": "...", "details": {...}, "hint": "..."}

In human mode the same calls print narration and progress to stderr and the result
text to stdout, so a person at a terminal gets prose and a pipe gets data.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from .errors import ErrorCode, RbeeError

EventKind = Literal["progress", "log", "result", "error"]
EVENT_KINDS: frozenset[str] = frozenset({"progress", "log", "result", "error"})

#: At most this many progress events per second reach the pipe.
PROGRESS_RATE = 10.0

#: Hints from the hive name the node this way (it does not know its inventory name); the keeper fills it in.
NODE_PLACEHOLDER = "<node>"


@dataclass(frozen=True, slots=True)
class NodeEvent:
    """One parsed line: its kind and every other key of the object."""

    event: EventKind
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def is_final(self) -> bool:
        return self.event in ("result", "error")

    def to_line(self) -> str:
        return json.dumps({"event": self.event, **self.data}, separators=(",", ":"), default=str)

    def to_error(self) -> RbeeError:
        """The `RbeeError` an `error` event stands for (with its hint, when the node gave one)."""
        if self.event != "error":
            raise ValueError(f"not an error event: {self.event}")
        return RbeeError(
            str(self.data.get("code") or ErrorCode.INTERNAL_ERROR),
            str(self.data.get("message") or ""),
            details=self.data.get("details") or {},
            hint=self.data.get("hint"),
        )


def parse_line(line: str) -> NodeEvent:
    """Parse one stdout line; `ValueError` if it is not one of our events."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON line: {line[:200]!r}") from exc
    if not isinstance(obj, dict) or obj.get("event") not in EVENT_KINDS:
        raise ValueError(f"not a node event: {line[:200]!r}")
    kind = obj.pop("event")
    return NodeEvent(kind, obj)


def progress_event(phase: str, done: int, total: int | None, speed: float | None) -> NodeEvent:
    return NodeEvent("progress", {"phase": phase, "bytes": done, "total": total, "speed": speed})


def error_event(err: RbeeError) -> NodeEvent:
    data: dict[str, Any] = {"code": err.code, "message": err.message, "details": err.details}
    if err.hint:
        data["hint"] = err.hint
    return NodeEvent("error", data)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Emitter:
    """Writes one command's events, as JSON lines or as text for a person.

    Progress is rate-limited (JSON: `PROGRESS_RATE`/s, human: 1/s) because a fast
    local copy would otherwise print thousands of lines into an SSH channel; the
    first and the last (``force=True``) progress events of a phase always pass.
    """

    def __init__(
        self,
        json_mode: bool,
        out: TextIO | None = None,
        err: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.json_mode = json_mode
        self._out = out or sys.stdout
        self._err = err or sys.stderr
        self._clock = clock
        self._interval = 1.0 / PROGRESS_RATE if json_mode else 1.0
        self._last_progress: dict[str, float] = {}
        self.finished = False

    def _write_json(self, event: NodeEvent) -> None:
        self._out.write(event.to_line() + "\n")
        self._out.flush()

    def progress(
        self, phase: str, done: int, total: int | None = None, speed: float | None = None, force: bool = False
    ) -> None:
        now = self._clock()
        last = self._last_progress.get(phase)
        if not force and last is not None and now - last < self._interval:
            return
        self._last_progress[phase] = now
        if self.json_mode:
            self._write_json(progress_event(phase, done, total, round(speed, 1) if speed else speed))
            return
        text = f"{phase}: {_human_bytes(done)}"
        if total:
            text += f" / {_human_bytes(total)} ({100 * done / total:.0f}%)"
        if speed:
            text += f" at {_human_bytes(speed)}/s"
        self._err.write(text + "\n")
        self._err.flush()

    def log(self, message: str) -> None:
        if self.json_mode:
            self._write_json(NodeEvent("log", {"message": message}))
        else:
            self._err.write(message + "\n")
            self._err.flush()

    def result(self, payload: dict[str, Any], human: str | None = None) -> None:
        """The command's one answer; `human` is what a person sees instead of the JSON."""
        self.finished = True
        if self.json_mode:
            self._write_json(NodeEvent("result", payload))
        else:
            text = human if human is not None else json.dumps(payload, indent=2, default=str)
            if text:
                self._out.write(text.rstrip("\n") + "\n")
                self._out.flush()

    def error(self, err: RbeeError) -> None:
        self.finished = True
        if self.json_mode:
            self._write_json(error_event(err))
            return
        self._err.write(f"error: {err.message}\n")
        if err.details:
            for key, value in err.details.items():
                self._err.write(f"  {key}: {value}\n")
        if err.hint:
            self._err.write(f"hint: {err.hint}\n")
        self._err.flush()
