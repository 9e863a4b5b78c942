"""Run template work off the event loop, with a time limit that actually stops it.

A chat template is a program from a model file; `{% for %}` loops nested three
deep keep a thread busy for hours in small steps, each of which the sandbox
allows. Each job gets a thread of its own; when the deadline passes, the caller
gets a 422 at once and the thread is interrupted with an exception raised inside
it (`PyThreadState_SetAsyncExc`, which CPython delivers between bytecodes), so
the CPU is free again moments later. At most `concurrency` jobs run at a time
(a thread counts until it has really ended), so a flood of hostile requests
queues instead of starving the token threads of the GIL. The event loop itself
only awaits: `/health` and running streams keep answering throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from .template import template_failed

T = TypeVar("T")

TIME_LIMIT_S = 1.0
CONCURRENCY = 2


class _Interrupted(BaseException):
    """Raised inside a job's thread at its deadline; a BaseException so templates' code cannot catch it."""


class _Job(Generic[T]):
    def __init__(self, func: Callable[[], T]) -> None:
        self.func = func
        self.result: T | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._running = True
        self.ident: int | None = None

    def run(self) -> None:
        try:
            try:
                self.result = self.func()
            finally:
                with self._lock:
                    self._running = False
        except BaseException as exc:  # the interruption may land anywhere in the block above
            self.error = exc

    def interrupt(self) -> None:
        """Raise `_Interrupted` in the job's thread, once, and only while the job still runs."""
        with self._lock:
            if self._running and self.ident is not None:
                self._running = False
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self.ident), ctypes.py_object(_Interrupted)
                )


class BoundedRunner:
    def __init__(self, time_limit: float = TIME_LIMIT_S, concurrency: int = CONCURRENCY) -> None:
        self.time_limit = time_limit
        self._slots = asyncio.Semaphore(concurrency)

    async def run(self, func: Callable[[], T], what: str = "the chat template") -> T:
        """`func()` on its own thread; its exceptions are re-raised here, a timeout is a 422."""
        await self._slots.acquire()
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        job = _Job(func)

        def body() -> None:
            try:
                job.run()
            except _Interrupted:
                job.error = job.error or _Interrupted()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown)
                    loop.call_soon_threadsafe(self._finished, finished)

        thread = threading.Thread(target=body, name="rbee-chat-template", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._slots.release()
            raise
        job.ident = thread.ident
        try:
            await asyncio.wait_for(asyncio.shield(finished), self.time_limit)
        except TimeoutError:
            job.interrupt()
            raise template_failed(
                f"{what} did not finish rendering within {self.time_limit:g} s", "time"
            ) from None
        except BaseException:
            job.interrupt()
            raise
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def _finished(self, finished: asyncio.Future[None]) -> None:
        self._slots.release()
        if not finished.done():
            finished.set_result(None)
