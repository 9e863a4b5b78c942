"""One loaded llama.cpp model serving many sequences at once (continuous batching).

`Model` holds the weights and vocabulary; `Scheduler` owns the one llama context
and a thread that decodes a single batch per step over every running sequence.
Requests join and leave between steps; each keeps its own sampler and KV cells.
"""

from .model import Model
from .scheduler import Scheduler, SequenceError
from .sequence import TokenSink

__all__ = ["Model", "Scheduler", "SequenceError", "TokenSink"]
