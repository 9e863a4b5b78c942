"""Streaming from real worker processes with both runtimes."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee_worker.protocol.events import DONE_DATA
from rbee_worker.runtimes import SamplingParams, runtime_factory

from ..worker_proc import WorkerProcess
from .sse import collect, text_of


def in_process_text(model: Path, backend: str, prompt: str, n: int, seed: int) -> str:
    """The same generation without HTTP, to prove the worker adds and loses nothing."""
    import codecs

    runtime = runtime_factory(backend)(str(model), context_length=16384, threads=1, progress=lambda f: None)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    tokens = runtime.generate(runtime.tokenize(prompt), SamplingParams(temperature=0.9, seed=seed))
    for count, token in enumerate(tokens, start=1):
        if runtime.is_eos(token):
            break
        out.append(decoder.decode(runtime.token_bytes(token)))
        if count == n:
            break
    out.append(decoder.decode(b"", final=True))
    runtime.close()
    return "".join(out)


@pytest.mark.parametrize("backend", ["ctransformers", pytest.param("llama-cpp", marks=pytest.mark.llama)])
async def test_stream_event_sequence_and_determinism(
    worker_factory: type[WorkerProcess], tiny_model: Path, backend: str
) -> None:
    worker = worker_factory(tiny_model, backend=backend, ctx=16384)
    ready = worker.wait_ready()
    assert ready["runtime"] == backend and ready["model"] == "rbee-tiny"
    body = {"prompt": "the bee", "max_tokens": 40, "seed": 7, "temperature": 0.9}
    async with worker.async_client() as client:
        events = await collect(client, body, headers={"X-Request-ID": "req-1"})
        again = await collect(client, body)
        other = await collect(client, {**body, "seed": 8})

    names = [e.name for e in events]
    assert names[0] == "started" and names[-1] == "end"
    assert set(names[1:-1]) == {"token"}
    assert events[0].data == {"request_id": "req-1", "model": "rbee-tiny"}
    end = events[-1].data
    assert end["tokens_out"] == 40 and end["stop_reason"] == "max_tokens"
    assert end["ttft_ms"] > 0 and end["decode_ms"] >= 0
    indices = [e.data["i"] for e in events if e.name == "token"]
    assert indices == sorted(indices) and indices[-1] <= 39

    assert text_of(events) == text_of(again), "same seed must give the same text"
    assert text_of(events) != text_of(other), "another seed should give other text"
    assert text_of(events) == in_process_text(tiny_model, backend, "the bee", 40, 7)


async def test_done_marker_closes_stream(tiny_worker: WorkerProcess) -> None:
    async with tiny_worker.async_client() as client:
        response = await client.post("/v1/inference", json={"prompt": "hi", "max_tokens": 3})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.rstrip().endswith(f"data: {DONE_DATA}")
    assert response.text.count("event: end") == 1


async def test_stop_sequence_ends_stream_before_it(tiny_worker: WorkerProcess) -> None:
    async with tiny_worker.async_client() as client:
        free = text_of(await collect(client, {"prompt": "a", "max_tokens": 60, "seed": 3}))
        # Pick a stop string the unconstrained run is known to produce part way.
        stop = next(free[i : i + 2] for i in range(5, len(free) - 2) if "\ufffd" not in free[i : i + 2])
        events = await collect(client, {"prompt": "a", "max_tokens": 60, "seed": 3, "stop": [stop]})
    assert events[-1].data["stop_reason"] == "stop"
    assert text_of(events) == free[: free.index(stop)]


async def test_health_and_metrics(tiny_worker: WorkerProcess) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async with tiny_worker.async_client() as client:
        await collect(client, {"prompt": "x", "max_tokens": 5})
        metrics = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert samples[("rbee_worker_tokens_total", ())] == 5
    assert samples[("rbee_worker_requests_total", (("outcome", "ok"),))] == 1
    assert samples[("rbee_worker_state", (("state", "ready"),))] == 1
    assert samples[("rbee_worker_slots_busy", ())] == 0
    assert samples[("rbee_worker_ttft_seconds_count", ())] == 1
    assert "rbee_worker_decode_seconds_per_token" in families


@pytest.mark.slow
@pytest.mark.llama
async def test_smollm2_answers_in_real_words(worker_factory: type[WorkerProcess], smollm2: Path) -> None:
    worker = worker_factory(smollm2, threads=2)
    assert worker.wait_ready(timeout=120)["runtime"] == "llama-cpp"
    prompt = (
        "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    async with worker.async_client() as client:
        events = await collect(client, {"prompt": prompt, "max_tokens": 24, "temperature": 0.0})
    text = text_of(events)
    assert "Paris" in text, text
    assert events[-1].data["stop_reason"] in {"eos", "max_tokens"}
