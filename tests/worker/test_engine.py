"""The batching engine in process, on the tiny model: seats, KV cells, sampler state."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama

import llama_cpp  # noqa: E402

from rbee_worker.engine import Model, Scheduler, SequenceError  # noqa: E402
from rbee_worker.engine.sampling import SamplerChain  # noqa: E402


class Recorder:
    """A token sink that keeps `limit` tokens, then ends its sequence."""

    def __init__(self, limit: int, cancel_after: int | None = None) -> None:
        self.limit = limit
        self.cancel_after = cancel_after
        self.tokens: list[int] = []
        self.threads: set[str] = set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.tokens) >= self.cancel_after

    def on_token(self, token: int) -> bool:
        self.threads.add(threading.current_thread().name)
        self.tokens.append(token)
        return len(self.tokens) < self.limit


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Iterator[Model]:
    loaded = Model(str(tiny_model))
    yield loaded
    loaded.close()


@pytest.fixture
def scheduler(model: Model) -> Iterator[Scheduler]:
    engine = Scheduler(model, sequences=3, context_per_sequence=512, threads=1)
    yield engine
    engine.close()


def cells_of(engine: Scheduler, seq_id: int) -> int:
    """Highest position seq_id holds in the KV cache; -1 when it holds none."""
    return int(llama_cpp.llama_memory_seq_pos_max(engine._memory, seq_id))


Job = tuple[int, list[int], Recorder, int]


def run_all(engine: Scheduler, jobs: list[Job]) -> list[BaseException | None]:
    errors: list[BaseException | None] = [None] * len(jobs)

    def one(i: int, seq_id: int, prompt: list[int], sink: Recorder, seed: int) -> None:
        try:
            engine.run(seq_id, prompt, SamplerChain(0.9, 0.95, 40, seed), sink)
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=one, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a sequence never ended"
    return errors


def test_concurrent_sequences_each_get_their_own_count_and_free_their_cells(
    model: Model, scheduler: Scheduler
) -> None:
    sinks = [Recorder(40), Recorder(75), Recorder(3)]
    prompts = [model.tokenize(p) for p in ("the bee", "a long prompt about hives " * 8, "x")]
    errors = run_all(scheduler, [(i, prompts[i], sinks[i], i) for i in range(3)])
    assert errors == [None, None, None]
    assert [len(s.tokens) for s in sinks] == [40, 75, 3]
    assert all(s.threads == {"rbee-engine"} for s in sinks), "tokens arrive on the scheduler's thread"
    assert [cells_of(scheduler, i) for i in range(3)] == [-1, -1, -1], "ended sequences keep no KV cells"
    assert scheduler.running == 0


def test_the_same_request_on_another_seat_gives_the_same_tokens(model: Model, scheduler: Scheduler) -> None:
    # One at a time, so the arithmetic is the same: the seat number and what ran before
    # must not matter. (Side by side, sequences sit in other KV cells and the float
    # summation order differs, so near-ties may break differently: not compared.)
    prompt = model.tokenize("the hive hums")
    sinks = [Recorder(60) for _ in range(3)]
    for seat in (2, 0, 1):
        scheduler.run(seat, prompt, SamplerChain(0.9, 0.95, 40, 11), sinks[seat])
    assert sinks[0].tokens == sinks[1].tokens == sinks[2].tokens


def test_a_cancelled_sequence_leaves_and_the_others_finish(model: Model, scheduler: Scheduler) -> None:
    prompt = model.tokenize("queen")
    sinks = [Recorder(10_000, cancel_after=5), Recorder(200), Recorder(150)]
    assert run_all(scheduler, [(i, prompt, sinks[i], i) for i in range(3)]) == [None] * 3
    assert len(sinks[0].tokens) == 5, "no token after the cancel is seen"
    assert [len(s.tokens) for s in sinks[1:]] == [200, 150]
    assert cells_of(scheduler, 0) == -1


def test_a_seat_is_reused_after_its_sequence_ends(model: Model, scheduler: Scheduler) -> None:
    prompt = model.tokenize("drone")
    first, second = Recorder(30), Recorder(30)
    scheduler.run(1, prompt, SamplerChain(0.9, 0.95, 40, 5), first)
    scheduler.run(1, prompt, SamplerChain(0.9, 0.95, 40, 5), second)
    assert first.tokens == second.tokens, "stale cells from the first run would change the second"


def test_bad_seats_and_prompts_are_refused(model: Model, scheduler: Scheduler) -> None:
    sampler = SamplerChain(0.0, 1.0, 0, None)
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        scheduler.run(3, [1, 2], sampler, Recorder(1))
    with pytest.raises(ValueError, match="does not fit 512"):
        scheduler.run(0, [1] * 513, SamplerChain(0.0, 1.0, 0, None), Recorder(1))
    with pytest.raises(ValueError, match="does not fit"):
        scheduler.run(0, [], SamplerChain(0.0, 1.0, 0, None), Recorder(1))


def test_a_busy_seat_is_refused_and_a_closed_engine_fails_its_sequences(model: Model) -> None:
    engine = Scheduler(model, sequences=1, context_per_sequence=4096, threads=1)
    prompt = model.tokenize("a")
    endless = Recorder(10**9)
    running = engine.start(0, prompt, SamplerChain(0.9, 0.95, 40, 1), endless)
    with pytest.raises(ValueError, match="already running"):
        engine.run(0, prompt, SamplerChain(0.9, 0.95, 40, 1), Recorder(1))
    engine.close()
    with pytest.raises(SequenceError, match="closed"):
        engine.wait(running)
    with pytest.raises(SequenceError, match="closed"):
        engine.run(0, prompt, SamplerChain(0.9, 0.95, 40, 1), Recorder(1))


def test_a_sequence_that_fills_its_context_ends_with_an_error(model: Model) -> None:
    engine = Scheduler(model, sequences=2, context_per_sequence=64, threads=1)
    try:
        with pytest.raises(SequenceError, match="filled its 64-token context"):
            engine.run(0, model.tokenize("abc"), SamplerChain(0.9, 0.95, 40, 1), Recorder(10**9))
        assert cells_of(engine, 0) == -1
    finally:
        engine.close()


def test_a_failing_receiver_ends_only_its_own_sequence(model: Model, scheduler: Scheduler) -> None:
    class Broken(Recorder):
        def on_token(self, token: int) -> bool:
            raise RuntimeError("receiver broke")

    prompt = model.tokenize("b")
    sinks = [Broken(5), Recorder(50)]
    errors = run_all(scheduler, [(0, prompt, sinks[0], 1), (1, prompt, sinks[1], 2)])
    assert isinstance(errors[0], SequenceError) and "receiver broke" in str(errors[0])
    assert errors[1] is None and len(sinks[1].tokens) == 50
    assert cells_of(scheduler, 0) == -1
