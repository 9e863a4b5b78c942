"""Generation slots: one runtime handle and one thread each, plus a bounded queue.

With llama-cpp a slot's runtime is a seat (one KV sequence) of a single shared
model that the batching engine decodes for all slots at once; ctransformers
cannot batch, so each of its slots owns a loaded copy. Either way a slot's
thread drives one generation at a time. Requests beyond `slots + queue` are
refused at once with ALL_SLOTS_BUSY instead of piling up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..protocol.errors import ErrorCode, RbeeError
from ..runtimes import Runtime

RETRY_AFTER_SECONDS = 1


@dataclass(eq=False)
class Slot:
    index: int
    runtime: Runtime
    busy: bool = False
    _thread: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"rbee-slot-{self.index}")

    def run_on_thread(self, fn: Callable[[], None]) -> None:
        """The slot's own long-lived thread: the runtime is always driven from one thread."""
        self._thread.submit(fn)


@dataclass(eq=False)
class SlotPool:
    queue_limit: int
    _slots: list[Slot] = field(default_factory=list)
    _owned: list[Runtime] = field(default_factory=list)
    _free: asyncio.Queue[Slot] = field(default_factory=asyncio.Queue)
    _waiting: int = 0
    _reserved: int = 0

    def own(self, runtime: Runtime) -> None:
        """A runtime the slots share (the batching engine's model): closed once, with the pool."""
        self._owned.append(runtime)

    def add(self, runtime: Runtime) -> None:
        slot = Slot(len(self._slots), runtime)
        self._slots.append(slot)
        self._free.put_nowait(slot)

    @property
    def runtime(self) -> Runtime:
        """Any slot's runtime, for what does not drive generation (features, grammar checks)."""
        return self._slots[0].runtime

    @property
    def size(self) -> int:
        return len(self._slots)

    @property
    def busy(self) -> int:
        return sum(slot.busy for slot in self._slots)

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def active(self) -> int:
        """Requests admitted and not finished: running or queued."""
        return self._reserved

    def reserve(self) -> None:
        """Admit one request or refuse it now; pair with `acquire` or `unreserve`."""
        if self._reserved >= self.size + self.queue_limit:
            raise RbeeError(
                ErrorCode.ALL_SLOTS_BUSY,
                f"all {self.size} slots busy and {self.queue_limit} requests queued; retry later",
                status=503,
                details={"slots": self.size, "queue": self.queue_limit, "retry_after": RETRY_AFTER_SECONDS},
            )
        self._reserved += 1

    def unreserve(self) -> None:
        self._reserved -= 1

    async def acquire(self) -> Slot:
        self._waiting += 1
        try:
            slot = await self._free.get()
        finally:
            self._waiting -= 1
        slot.busy = True
        return slot

    def release(self, slot: Slot) -> None:
        slot.busy = False
        self._reserved -= 1
        self._free.put_nowait(slot)

    def close(self) -> None:
        for slot in self._slots:
            slot._thread.shutdown(wait=False, cancel_futures=True)
            slot.runtime.close()
        for runtime in self._owned:
            runtime.close()
        self._slots.clear()
        self._owned.clear()
