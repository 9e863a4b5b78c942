"""The worker's HTTP/SSE application."""

from .server import create_app, serve
from .state import WorkerConfig

__all__ = ["WorkerConfig", "create_app", "serve"]
