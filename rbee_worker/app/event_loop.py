"""The event loop the worker and the queen serve on: uvloop where it is installed.

uvloop makes each SSE write and relayed token cheaper, but it is not required: it
does not install on Windows (or PyPy), and without it uvicorn serves on asyncio's
own loop. (The HTTP parser is always httptools: the connection guard in
`connections.py` is built on uvicorn's httptools protocol.)
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def choose(available: Callable[[str], bool] = importable) -> str:
    """The loop to serve on: "uvloop" when it is installed here, else "asyncio"."""
    return "uvloop" if available("uvloop") else "asyncio"


def loop_factory(loop: str) -> LoopFactory | None:
    if loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None  # asyncio's default loop


def run(main: Coroutine[Any, Any, T], loop: str | None = None) -> T:
    """Run `main` to completion on `loop` (by default the one `choose()` picks)."""
    with asyncio.Runner(loop_factory=loop_factory(loop or choose())) as runner:
        return runner.run(main)
