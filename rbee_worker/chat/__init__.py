"""Chat on the worker: OpenAI messages to a prompt with the model's own template, within limits."""

from .bounded import BoundedRunner
from .renderer import ChatRenderer, chat_renderer
from .template import FALLBACK_STOP, ChatTemplate, RenderedPrompt

__all__ = [
    "FALLBACK_STOP", "BoundedRunner", "ChatRenderer", "ChatTemplate", "RenderedPrompt", "chat_renderer",
]  # fmt: skip
