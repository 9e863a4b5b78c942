"""The typed wire models: each form parses once, refuses bad input by field, and round-trips."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from rbee_worker.protocol.embeddings import EmbeddingRequest, decode_vector, encode_vector
from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.hive_api import ModelInfo, ReadyReport, WorkerInfo
from rbee_worker.protocol.queen_api import WorkerRegistration
from rbee_worker.protocol.spawn import SpawnRequest, add_spawn_arguments


def test_error_codes_carry_their_default_status() -> None:
    assert ErrorCode.ALL_SLOTS_BUSY.status == 503
    assert RbeeError(ErrorCode.INVALID_REQUEST, "x").status == 400
    assert RbeeError("MODEL_NOT_FOUND", "a peer's code as text").status == 404
    assert RbeeError("SOMETHING_NEWER", "a code this side does not know").status == 500
    assert RbeeError(ErrorCode.INVALID_REQUEST, "a site that differs", status=409).status == 409
    assert str(ErrorCode.ALL_SLOTS_BUSY) == "ALL_SLOTS_BUSY"


def _field_error(call: Any) -> str:
    with pytest.raises(RbeeError) as info:
        call()
    assert info.value.code == ErrorCode.INVALID_REQUEST and info.value.status == 400
    return str(info.value.details["field"])


def test_spawn_request_json_round_trip_and_ctx_alias() -> None:
    req = SpawnRequest.from_json(
        {"model": "tiny", "runtime": "llama-cpp", "backend": "cuda", "device": 1, "gpu_layers": "all",
         "slots": 4, "ctx": 4096, "wait": True, "timeout": 30}
    )  # fmt: skip
    assert (req.runtime, req.backend, req.device, req.gpu_layers) == ("llama-cpp", "cuda", 1, "all")
    assert req.ctx_size == 4096 and req.slots == 4 and req.wait and req.timeout == 30.0
    assert SpawnRequest.from_json(req.to_json()) == req
    assert SpawnRequest.from_json({"model": "tiny"}) == SpawnRequest("tiny")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "model"),
        ({"model": ""}, "model"),
        ({"model": "tiny", "runtime": "cuda"}, "runtime"),
        ({"model": "tiny", "backend": "gpu"}, "backend"),
        ({"model": "tiny", "gpu_layers": "most"}, "gpu_layers"),
        ({"model": "tiny", "gpu_layers": -1}, "gpu_layers"),
        ({"model": "tiny", "slots": 0}, "slots"),
        ({"model": "tiny", "slots": "2"}, "slots"),
        ({"model": "tiny", "ctx_size": 8}, "ctx_size"),
        ({"model": "tiny", "device": -1}, "device"),
        ({"model": "tiny", "wait": "yes"}, "wait"),
        ({"model": "tiny", "timeout": -1}, "timeout"),
        ({"model": "tiny", "colour": "red"}, "colour"),
    ],
)
def test_spawn_request_refuses_bad_fields_by_name(body: dict[str, Any], field: str) -> None:
    assert _field_error(lambda: SpawnRequest.from_json(body)) == field


def test_spawn_request_flags_are_the_same_on_every_command_line() -> None:
    parser = argparse.ArgumentParser()
    add_spawn_arguments(parser)
    argv = ["--model", "tiny", "--runtime", "ctransformers", "--ctx", "2048", "--gpu-layers", "12", "--wait"]
    req = SpawnRequest.from_args(parser.parse_args(argv))
    assert req == SpawnRequest("tiny", runtime="ctransformers", ctx_size=2048, gpu_layers=12, wait=True)
    assert SpawnRequest.from_args(parser.parse_args(req.to_argv())) == req
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "tiny", "--gpu-layers", "lots"])


def test_a_runtime_named_as_backend_still_selects_the_runtime() -> None:
    """Before `runtime` existed `backend` named it: old callers keep working, on any device."""
    assert SpawnRequest.from_json({"model": "tiny", "backend": "ctransformers"}) == SpawnRequest(
        "tiny", runtime="ctransformers"
    )
    parser = argparse.ArgumentParser()
    add_spawn_arguments(parser)
    req = SpawnRequest.from_args(parser.parse_args(["--model", "tiny", "--backend", "llama-cpp"]))
    assert (req.runtime, req.backend) == ("llama-cpp", "auto")
    both = SpawnRequest.from_json({"model": "tiny", "runtime": "ctransformers", "backend": "llama-cpp"})
    assert (both.runtime, both.backend) == ("ctransformers", "auto")


def test_device_refusals_carry_their_status() -> None:
    assert RbeeError(ErrorCode.INSUFFICIENT_VRAM, "x").status == 507
    assert RbeeError(ErrorCode.BACKEND_NOT_AVAILABLE, "x").status == 422


def test_answers_from_a_peer_ignore_fields_this_side_does_not_know() -> None:
    worker = WorkerInfo.from_json(
        {"id": "w", "url": "http://h:1", "model": "m", "state": "idle", "api_key": "k", "colour": "red"}
    )
    assert worker.api_key == "k" and "api_key" not in worker.public()
    row = ModelInfo.from_json({"name": "m", "context_length": "big", "chat_template": "", "size": 3})
    assert row.context_length is None and row.chat_template is None and row.size == 3
    with pytest.raises(RbeeError) as info:
        WorkerInfo.from_json({"id": "w"})
    assert info.value.code == ErrorCode.INTERNAL_ERROR


def test_ready_report_round_trip_and_refusals() -> None:
    failed = ReadyReport("w1", "failed", error=RbeeError(ErrorCode.MODEL_LOAD_FAILED, "bad file"))
    parsed = ReadyReport.from_json(failed.to_json())
    assert parsed.error is not None and parsed.error.code == "MODEL_LOAD_FAILED" and not parsed.ready
    assert _field_error(lambda: ReadyReport.from_json({"worker_id": "w1", "state": "gone"})) == "state"
    assert _field_error(lambda: ReadyReport.from_json({"state": "ready"})) == "worker_id"
    assert _field_error(lambda: ReadyReport.from_json({"worker_id": "w", "state": "ready", "x": 1})) == "x"


def test_registration_takes_the_seeds_names_and_normalises_the_url() -> None:
    reg = WorkerRegistration.from_json(
        {"worker_id": "w1", "url": "http://10.0.0.5:8081/", "api_key": "k", "model_ref": "tiny",
         "node_name": "gpu", "slots_total": 2, "backend": "cuda", "device": 0, "vram_bytes": 1 << 30}
    )  # fmt: skip
    assert (reg.id, reg.model, reg.node, reg.slots) == ("w1", "tiny", "gpu", 2)
    assert reg.url == "http://10.0.0.5:8081" and reg.vram_bytes == 1 << 30 and reg.device == 0
    assert WorkerRegistration.from_json(reg.to_json()) == reg


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"api_key": "k"}, "url"),
        ({"url": "ftp://h:1", "api_key": "k"}, "url"),
        ({"url": "http://h:1"}, "api_key"),
        ({"url": "http://h:1", "api_key": "k", "id": "a", "worker_id": "b"}, "worker_id"),
        ({"url": "http://h:1", "api_key": "k", "vram_bytes": -1}, "vram_bytes"),
        ({"url": "http://h:1", "api_key": "k", "slots": 0}, "slots"),
        ({"url": "http://h:1", "api_key": "k", "colour": "red"}, "colour"),
    ],
)
def test_registration_refuses_bad_fields_by_name(body: dict[str, Any], field: str) -> None:
    assert _field_error(lambda: WorkerRegistration.from_json(body)) == field


def test_a_cache_type_travels_in_every_spawn_form() -> None:
    req = SpawnRequest("tiny", cache_type="q8_0", wait=True)
    assert SpawnRequest.from_json(req.to_json()) == req
    assert "cache_type" not in SpawnRequest("tiny").to_json()  # an older hive takes the body unchanged
    parser = argparse.ArgumentParser()
    add_spawn_arguments(parser)
    assert req.to_argv()[-2:] == ["--cache-type", "q8_0"]
    assert SpawnRequest.from_args(parser.parse_args(req.to_argv())) == req
    assert _field_error(lambda: SpawnRequest.from_json({"model": "tiny", "cache_type": "q5"})) == "cache_type"
    ct = {"model": "tiny", "cache_type": "q4_0", "runtime": "ctransformers"}
    assert _field_error(lambda: SpawnRequest.from_json(ct)) == "cache_type"


def test_embedding_travels_in_every_spawn_form_and_the_ready_report() -> None:
    req = SpawnRequest("tiny", embedding=True, wait=True)
    assert SpawnRequest.from_json(req.to_json()) == req
    assert "embedding" not in SpawnRequest("tiny").to_json()  # an older hive takes the body unchanged
    parser = argparse.ArgumentParser()
    add_spawn_arguments(parser)
    assert "--embedding" in req.to_argv()
    assert SpawnRequest.from_args(parser.parse_args(req.to_argv())) == req
    assert _field_error(lambda: SpawnRequest.from_json({"model": "tiny", "embedding": "yes"})) == "embedding"
    both = {"model": "tiny", "embedding": True, "runtime": "ctransformers"}
    assert _field_error(lambda: SpawnRequest.from_json(both)) == "runtime"
    no_flag = argparse.ArgumentParser()
    add_spawn_arguments(no_flag, model=False, wait=False, embedding=False)
    assert not hasattr(no_flag.parse_args([]), "embedding")
    ready = ReadyReport("w1", "ready", embedding=True)
    assert ReadyReport.from_json(ready.to_json()).embedding is True
    assert ReadyReport.from_json({"worker_id": "w1", "state": "ready"}).embedding is False
    body = {"worker_id": "w", "state": "ready", "embedding": 1}
    assert _field_error(lambda: ReadyReport.from_json(body)) == "embedding"


def test_embedding_requests_parse_once_for_worker_and_queen() -> None:
    req = EmbeddingRequest.from_json({"input": "a", "model": "m", "encoding_format": "base64"})
    assert req.input == ("a",) and EmbeddingRequest.from_json(req.to_json()) == req
    assert decode_vector(encode_vector([0.5, -1.0], "base64")) == [0.5, -1.0]
    assert encode_vector([0.5], "float") == [0.5]
    for body, field in [
        ({"input": None}, "input"),
        ({"input": [True]}, "input"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "user": 3}, "user"),
        ({"input": "x", "model": ""}, "model"),
        ([], "body"),
    ]:
        assert _field_error(lambda body=body: EmbeddingRequest.from_json(body)) == field
