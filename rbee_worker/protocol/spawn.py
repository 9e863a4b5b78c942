"""What starting a worker takes: one `SpawnRequest` from the keeper's CLI to the hive to the queen.

The same object is built from the keeper's flags, travels as `rbee-hive worker
spawn` flags over SSH and as the JSON body of the hive's `POST /v1/workers/spawn`,
and is what the queen's cold start asks for; each form is parsed and validated
here, once, so every edge refuses the same bad input with the same message.

`runtime` picks the GGUF runtime (llama-cpp | ctransformers | auto); `backend`,
`device` and `gpu_layers` pick the hardware (the seeds' names). Before `runtime`
existed `backend` named the runtime, and a runtime name there still selects it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any, Literal, cast

from .errors import RbeeError
from .rpc import parse_endpoint
from .wire import invalid, opt_float, opt_int, opt_str, reject_unknown

RUNTIMES = ("llama-cpp", "ctransformers")
DEVICE_BACKENDS = ("cpu", "cuda", "metal")
#: KV cache element types (llama.cpp's -ctk/-ctv): f16 is llama.cpp's default, q8_0 halves the cache
CACHE_TYPES = ("f16", "q8_0", "q4_0")
DEFAULT_CACHE_TYPE = "f16"
AUTO = "auto"
MIN_CTX = 16
#: GGML_RPC_MAX_SERVERS
MAX_RPC_SERVERS = 16

#: "auto" (offload what fits), "all", or a layer count.
GpuLayers = Literal["auto", "all"] | int


def parse_gpu_layers(value: Any) -> GpuLayers:
    if value == AUTO or value == "all":
        return cast(GpuLayers, value)
    if isinstance(value, str) and value.isdecimal():  # isdigit() also takes "²", which int() refuses
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise invalid("gpu_layers", f"expected auto, all or a layer count, got {value!r}")


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value is None:
        return AUTO
    if not isinstance(value, str) or value not in (AUTO, *choices):
        raise invalid(name, f"expected one of {AUTO}, {', '.join(choices)}; got {value!r}")
    return value


def split_legacy_backend(runtime: Any, backend: Any) -> tuple[Any, Any]:
    """(runtime, backend): a runtime name given as `backend` selects the runtime, on any device."""
    if isinstance(backend, str) and backend in RUNTIMES:
        return (backend if runtime in (None, AUTO) else runtime), AUTO
    return runtime, backend


@dataclass(frozen=True, slots=True)
class SpawnRequest:
    model: str
    runtime: str = AUTO
    backend: str = AUTO
    device: int | None = None
    gpu_layers: GpuLayers = "auto"
    slots: int = 1
    ctx_size: int | None = None
    threads: int | None = None
    idle_timeout: float | None = None
    #: answer once the model is loaded (or failed), at most `timeout` seconds (default: the hive's)
    wait: bool = False
    timeout: float | None = None
    #: llama.cpp RPC servers (`host:port`) holding layers: a split worker (llama-cpp only)
    rpc_servers: tuple[str, ...] = ()
    #: layer share per device (llama.cpp's --tensor-split); empty: by each device's free memory
    tensor_split: tuple[float, ...] = ()
    #: a worker for `/v1/embeddings` (llama.cpp pooling) instead of generation
    embedding: bool = False
    #: KV cache type (llama-cpp only)
    cache_type: str = DEFAULT_CACHE_TYPE

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise invalid("model", "required: a catalog name")
        object.__setattr__(self, "rpc_servers", parse_rpc_servers(self.rpc_servers))
        object.__setattr__(self, "tensor_split", parse_tensor_split(self.tensor_split))
        if self.rpc_servers and self.runtime == "ctransformers":
            raise invalid("rpc_servers", "a split over RPC servers needs the llama-cpp runtime")
        _choice(self.runtime, "runtime", RUNTIMES)
        _choice(self.backend, "backend", DEVICE_BACKENDS)
        parse_gpu_layers(self.gpu_layers)
        checks = (
            ("device", self.device, 0),
            ("slots", self.slots, 1),
            ("ctx_size", self.ctx_size, MIN_CTX),
            ("threads", self.threads, 1),
            ("idle_timeout", self.idle_timeout, 0),
            ("timeout", self.timeout, 0),
        )
        for name, value, minimum in checks:
            if value is not None and value < minimum:
                raise invalid(name, f"expected >= {minimum}, got {value!r}")
        if self.embedding and self.runtime == "ctransformers":
            raise invalid("runtime", "ctransformers cannot compute embeddings; use llama-cpp")
        if not isinstance(self.cache_type, str) or self.cache_type not in CACHE_TYPES:
            raise invalid("cache_type", f"expected one of {', '.join(CACHE_TYPES)}; got {self.cache_type!r}")
        if self.cache_type != DEFAULT_CACHE_TYPE and self.runtime == "ctransformers":
            raise invalid("cache_type", "ctransformers has no KV cache types; use llama-cpp")

    # --- JSON: the hive API body ------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if not self.embedding:  # a hive that predates embeddings takes the body unchanged
            body.pop("embedding")
        if self.cache_type == DEFAULT_CACHE_TYPE:  # and one that predates cache types
            body.pop("cache_type")
        for name in ("rpc_servers", "tensor_split"):  # and one that predates split workers, too
            if body[name]:
                body[name] = list(body[name])
            else:
                del body[name]
        return body

    @classmethod
    def from_json(cls, body: Any) -> SpawnRequest:
        if not isinstance(body, dict):
            raise invalid("body", "expected a JSON object")
        body = dict(body)
        if "ctx" in body and "ctx_size" not in body:
            body["ctx_size"] = body.pop("ctx")
        reject_unknown(body, {f.name for f in fields(cls)})
        wait = body.get("wait", False)
        if not isinstance(wait, bool):
            raise invalid("wait", "expected true or false")
        embedding = body.get("embedding", False)
        if not isinstance(embedding, bool):
            raise invalid("embedding", "expected true or false")
        model = opt_str(body, "model")
        if model is None:
            raise invalid("model", "required: a catalog name")
        runtime, backend = split_legacy_backend(body.get("runtime"), body.get("backend"))
        return cls(
            model=model,
            runtime=_choice(runtime, "runtime", RUNTIMES),
            backend=_choice(backend, "backend", DEVICE_BACKENDS),
            device=opt_int(body, "device", 0),
            gpu_layers=parse_gpu_layers(body.get("gpu_layers", AUTO)),
            slots=opt_int(body, "slots", 1) or 1,
            ctx_size=opt_int(body, "ctx_size", MIN_CTX),
            threads=opt_int(body, "threads", 1),
            idle_timeout=opt_float(body, "idle_timeout", 0),
            wait=wait,
            timeout=opt_float(body, "timeout", 0),
            rpc_servers=body.get("rpc_servers") or (),
            tensor_split=body.get("tensor_split") or (),
            embedding=embedding,
            cache_type=body.get("cache_type", DEFAULT_CACHE_TYPE),
        )

    # --- flags: the keeper's and the hive's command lines -------------------------

    def to_argv(self) -> list[str]:
        """`rbee-hive worker spawn` flags for this request (defaults left out)."""
        argv = ["--model", self.model, "--runtime", self.runtime, "--slots", str(self.slots)]
        if self.backend != AUTO:
            argv += ["--backend", self.backend]
        if self.device is not None:
            argv += ["--device", str(self.device)]
        if self.gpu_layers != AUTO:
            argv += ["--gpu-layers", str(self.gpu_layers)]
        for name in ("ctx_size", "threads", "idle_timeout", "timeout"):
            value = getattr(self, name)
            if value is not None:
                argv += [
                    f"--{name.replace('_', '-')}",
                    f"{value:g}" if isinstance(value, float) else str(value),
                ]
        if self.rpc_servers:
            argv += ["--rpc", ",".join(self.rpc_servers)]
        if self.tensor_split:
            argv += ["--tensor-split", ",".join(f"{w:g}" for w in self.tensor_split)]
        if self.wait:
            argv.append("--wait")
        if self.embedding:
            argv.append("--embedding")
        if self.cache_type != DEFAULT_CACHE_TYPE:
            argv += ["--cache-type", self.cache_type]
        return argv

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> SpawnRequest:
        """From a namespace built with `add_spawn_arguments`; bad values become usage-grade errors."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values.update(overrides)
        runtime, backend = split_legacy_backend(values.get("runtime"), values.get("backend"))
        values["runtime"], values["backend"] = runtime, backend
        return cls(**{k: v for k, v in values.items() if v is not None})


def add_spawn_arguments(
    parser: argparse.ArgumentParser, *, model: bool = True, wait: bool = True, embedding: bool = True
) -> None:
    """The spawn flags, defined once for every command line that starts a worker."""
    if model:
        parser.add_argument("--model", required=True, help="a catalog name on the node")
    parser.add_argument(
        "--runtime", choices=[AUTO, *RUNTIMES], default=AUTO, help="GGUF runtime (default: by architecture)"
    )
    parser.add_argument(
        "--backend",
        choices=[AUTO, *DEVICE_BACKENDS, *RUNTIMES],
        default=AUTO,
        help="where to run: auto (a GPU the runtime can drive, else cpu), cpu, cuda, metal "
        "(a runtime name here still selects the runtime)",
    )
    parser.add_argument("--device", type=int, help="device index (default: the backend's first)")
    parser.add_argument(
        "--gpu-layers", type=_gpu_layers_flag, default=AUTO, help="auto (what fits), all, or a layer count"
    )
    parser.add_argument("--slots", type=int, default=1, help="concurrent generations")
    parser.add_argument("--ctx-size", "--ctx", dest="ctx_size", type=int, help="context length per slot")
    parser.add_argument("--threads", type=int, help="runtime threads (default: half the cores)")
    parser.add_argument(
        "--idle-timeout", type=float, help="seconds idle before it is stopped (default: hive's)"
    )
    parser.add_argument(
        "--cache-type",
        choices=CACHE_TYPES,
        default=DEFAULT_CACHE_TYPE,
        help="KV cache type: f16 (llama.cpp's default), q8_0 (half the memory), q4_0",
    )
    parser.add_argument(
        "--rpc",
        dest="rpc_servers",
        type=_rpc_flag,
        help="host:port,... of llama.cpp RPC servers to place layers on (a split worker)",
    )
    parser.add_argument(
        "--tensor-split",
        type=_split_flag,
        help="layer share per device, e.g. 1,1 (default: by each device's free memory)",
    )
    if embedding:
        parser.add_argument(
            "--embedding",
            action="store_true",
            help="serve embeddings (POST /v1/embeddings, llama.cpp pooling) instead of text generation",
        )
    if wait:
        parser.add_argument("--wait", action="store_true", help="return when the model is loaded (or failed)")
        parser.add_argument("--timeout", type=float, help="seconds to wait for --wait (default: hive's)")


def parse_rpc_servers(value: Any) -> tuple[str, ...]:
    """A list (JSON) or comma-separated text (flags) of `host:port` endpoints, each checked."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise invalid("rpc_servers", f"expected a list of host:port, got {value!r}")
    if len(set(value)) != len(value):
        raise invalid("rpc_servers", "an endpoint is named twice")
    if len(value) > MAX_RPC_SERVERS:
        raise invalid("rpc_servers", f"llama.cpp takes at most {MAX_RPC_SERVERS} RPC servers")
    for endpoint in value:
        parse_endpoint(endpoint)
    return tuple(value)


def parse_tensor_split(value: Any) -> tuple[float, ...]:
    if isinstance(value, str):
        try:
            value = [float(part) for part in value.split(",")]
        except ValueError:
            raise invalid("tensor_split", f"expected numbers separated by commas, got {value!r}") from None
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise invalid("tensor_split", f"expected a list of numbers, got {value!r}")
    if value and (any(not v >= 0 for v in value) or not any(v > 0 for v in value)):  # `not >=` refuses nan
        raise invalid("tensor_split", "weights must be >= 0 and not all 0")
    return tuple(float(v) for v in value)


def _rpc_flag(text: str) -> tuple[str, ...]:
    try:
        return parse_rpc_servers(text)
    except RbeeError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _split_flag(text: str) -> tuple[float, ...]:
    try:
        return parse_tensor_split(text)
    except RbeeError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _gpu_layers_flag(text: str) -> GpuLayers:
    try:
        return parse_gpu_layers(text)
    except RbeeError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


__all__ = [
    "AUTO",
    "DEVICE_BACKENDS",
    "RUNTIMES",
    "SpawnRequest",
    "add_spawn_arguments",
    "parse_gpu_layers",
    "parse_rpc_servers",
    "parse_tensor_split",
    "split_legacy_backend",
]
