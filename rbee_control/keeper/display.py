"""What the operator sees: rich renderables for progress, tables and errors.

Narration and progress go to stderr, so `rbee-keeper infer … > answer.txt`
captures only the tokens; `--json` replaces all of it with JSON on stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from rbee_worker.protocol.errors import RbeeError
from rbee_worker.protocol.node_events import NodeEvent


class Display:
    """One CLI run's output: human (rich, on stderr) or machine (`--json` on stdout)."""

    def __init__(self, json_mode: bool = False, stderr: Console | None = None, stdout: Console | None = None):
        self.json_mode = json_mode
        self.err = stderr or Console(stderr=True, highlight=False)
        self.out = stdout or Console(highlight=False, soft_wrap=True)

    def narrate(self, message: str) -> None:
        # soft_wrap: a line stays one line in a pipe or log file (rich would cut it at 80 columns)
        if not self.json_mode:
            self.err.print(message, soft_wrap=True)

    def result(self, payload: Any, human: object | None = None) -> None:
        if self.json_mode:
            sys.stdout.write(json.dumps(payload, default=str) + "\n")
            sys.stdout.flush()
        elif human is not None:
            self.out.print(human)

    def error(self, err: RbeeError) -> None:
        if self.json_mode:
            sys.stdout.write(json.dumps(err.body() | ({"hint": err.hint} if err.hint else {})) + "\n")
            sys.stdout.flush()
            return
        self.err.print(Text.assemble(("error", "bold red"), f" [{err.code}]: ", err.message), soft_wrap=True)
        if err.hint:
            self.err.print(Text.assemble(("  try: ", "dim"), (err.hint, "bold")), soft_wrap=True)

    def node_error(self, node: str, err: RbeeError) -> None:
        """One node's failure inside a fan-out: its cause and the command to try, on stderr."""
        if self.json_mode:
            return
        self.err.print(Text.assemble((node, "red"), f": {err.message}"))
        if err.hint:
            self.err.print(Text.assemble(("  try: ", "dim"), (err.hint, "bold")))

    def progress(self) -> NodeProgress:
        return NodeProgress(self)


class _AmountColumn(ProgressColumn):
    """Bytes and speed for transfers; nothing for steps that are not measured in bytes."""

    def __init__(self) -> None:
        super().__init__()
        self._download, self._speed = DownloadColumn(), TransferSpeedColumn()

    def render(self, task: Task) -> Text:
        if not task.fields.get("bytes", True):
            return Text("")
        return Text.assemble(self._download.render(task), " ", self._speed.render(task))


class NodeProgress:
    """Rich progress bars fed by node `progress` events, one bar per (node, phase)."""

    def __init__(self, display: Display) -> None:
        self._display = display
        self._enabled = not display.json_mode
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            _AmountColumn(),
            TimeRemainingColumn(),
            console=display.err,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> NodeProgress:
        if self._enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._enabled:
            self._progress.stop()

    def update(self, label: str, done: int, total: int | None, *, in_bytes: bool = True) -> None:
        if not self._enabled:
            return
        task = self._tasks.get(label)
        if task is None:
            task = self._tasks[label] = self._progress.add_task(label, total=total, bytes=in_bytes)
        self._progress.update(task, completed=done, total=total)

    def note(self, message: str) -> None:
        """A line of narration between the bars (rich keeps the bars below it)."""
        self._display.narrate(message)

    def on_event(self, node: str) -> Any:
        """A callback for `NodeClient` methods: draws each progress event of `node`."""

        def handle(event: NodeEvent) -> None:
            if event.event == "progress":
                phase = str(event.data.get("phase", "work"))
                self.update(f"{node}: {phase}", int(event.data.get("bytes") or 0), event.data.get("total"))

        return handle


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[object]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*(str(cell) if cell is not None else "-" for cell in row))
    return t


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
