"""A request's constraints made ready for its runtime: refused by name if the runtime lacks them.

Runs at the edge, before a slot is taken, so an unusable grammar or JSON schema
is a 400 with nothing started. A JSON schema becomes the GBNF grammar the
engine's sampler chain takes, off the event loop (the converter is Python).
"""

from __future__ import annotations

import asyncio
import dataclasses

from ..protocol.constraints import Constraints
from ..protocol.request import InferenceRequest
from ..protocol.wire import invalid
from ..runtimes import GrammarRuntime, Runtime


def used_features(c: Constraints) -> list[str]:
    """The constraint fields a request sets to anything but their neutral value."""
    defaults = Constraints()
    return [
        name
        for name in ("repeat_penalty", "presence_penalty", "frequency_penalty", "penalty_last_n",
                     "logit_bias", "logprobs", "grammar", "json_schema", "tools")
        if getattr(c, name) != getattr(defaults, name)
    ]  # fmt: skip


async def prepare_constraints(request: InferenceRequest, runtime: Runtime) -> InferenceRequest:
    c = request.constraints
    for name in used_features(c):
        if name not in runtime.features:
            raise invalid(
                name, f"the {runtime.name} runtime cannot honour it; run this model with --runtime llama-cpp"
            )
    if c.logit_bias and isinstance(runtime, GrammarRuntime):
        outside = [token for token in c.logit_bias if token >= runtime.vocab_size]
        if outside:
            raise invalid(
                "logit_bias",
                f"token {outside[0]} is not in the model's {runtime.vocab_size}-token vocabulary",
            )
    if c.grammar is None and c.json_schema is None:
        return request
    if not isinstance(runtime, GrammarRuntime):
        raise invalid("json_schema" if c.json_schema is not None else "grammar",
                      f"the {runtime.name} runtime has no grammars")  # fmt: skip
    grammar = await asyncio.to_thread(runtime.grammar_for, c.grammar, c.json_schema)
    constraints = dataclasses.replace(c, grammar=grammar, json_schema=None)
    return dataclasses.replace(request, constraints=constraints)
