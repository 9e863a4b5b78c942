"""The event loop and HTTP parser the worker and the queen serve on.

uvloop and httptools make each SSE write and relayed token cheaper, but neither is
required: they are not installed on Windows (or PyPy), and without them uvicorn
serves on asyncio's own loop with its pure-Python h11 parser.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Serving:
    loop: str  # "uvloop" | "asyncio"
    http: str  # "httptools" | "h11", uvicorn's names for its parsers

    def loop_factory(self) -> Callable[[], asyncio.AbstractEventLoop] | None:
        if self.loop == "uvloop":
            import uvloop

            return uvloop.new_event_loop
        return None  # asyncio's default loop

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=self.loop_factory()) as runner:
            return runner.run(main)


def choose(available: Callable[[str], bool] = importable) -> Serving:
    """The fastest loop and parser installed here."""
    return Serving(
        loop="uvloop" if available("uvloop") else "asyncio",
        http="httptools" if available("httptools") else "h11",
    )
