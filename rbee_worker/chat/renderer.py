"""The worker's chat support: its model's template, rendered off the event loop within limits."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from ..gguf_info import GGUFInfo
from ..protocol.errors import RbeeError
from ..protocol.request import InferenceRequest
from ..runtimes import Runtime
from .bounded import BoundedRunner
from .template import ChatTemplate, output_cap

log = logging.getLogger("rbee.worker")


@dataclasses.dataclass(frozen=True, slots=True)
class ChatRenderer:
    template: ChatTemplate
    runner: BoundedRunner
    #: `gguf` when the model's own template compiles, else `fallback`
    source: str

    async def prepare(self, request: InferenceRequest) -> InferenceRequest:
        """The request with its messages rendered into `prompt` and the template's stops added."""
        messages = request.messages
        if messages is None:
            return request
        tools = request.constraints.tools
        rendered = await self.runner.run(lambda: self.template.render(messages, request.chat_template, tools))
        stop = list(dict.fromkeys([*request.stop, *rendered.stop]))
        return dataclasses.replace(request, prompt=rendered.prompt, stop=stop)

    def ready_fields(self) -> dict[str, object]:
        return {"chat": self.source == "gguf", "chat_template": self.source}


async def chat_renderer(
    info: GGUFInfo, runtime: Runtime, runner: BoundedRunner | None = None
) -> ChatRenderer:
    """Build once the model is loaded, before any request uses `runtime` (runtimes are not thread-safe)."""
    runner = runner or BoundedRunner()
    adds_bos = bool(await asyncio.to_thread(runtime.tokenize, ""))
    template = ChatTemplate(
        info.chat_template, info.bos_token, info.eos_token, adds_bos, output_cap(runtime.context_length)
    )
    try:
        source = await runner.run(lambda: template.source, "the model's chat template")
    except RbeeError as exc:  # it does not even compile in time: as good as none
        log.warning("chat template unusable, using the fallback: %s", exc.message)
        template, source = dataclasses.replace(template, template=None), "fallback"
    return ChatRenderer(template, runner, source)
