"""Tessera's Python SDK.

Module side: subclass `tessera.Task` in a module file; the node runs it with
`python -m tessera.host model.py` (see tessera.task and tessera.host).

Client side: `tessera.connect("my.model").predict(x)` calls a module through a node's HTTP
gateway (see tessera.client).

numpy is needed only for tensors.
"""

from .client import CallError, Client, Handle, Queue, connect
from .task import ContextError, Dataset, Task, expose

__version__ = "0.1.0"

__all__ = [
    "CallError",
    "Client",
    "ContextError",
    "Dataset",
    "Handle",
    "Queue",
    "Task",
    "connect",
    "expose",
]
