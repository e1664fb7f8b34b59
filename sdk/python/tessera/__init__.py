"""Tessera's Python SDK.

Module side: subclass `tessera.Task` in a module file; the node runs it with
`python -m tessera.host model.py` (see tessera.task and tessera.host).

Swarms: `tessera.swarm` declares tasks, where they run and their flow (Manta's Swarm,
Task and Module), for `tessera swarm run swarm.py`.

Client side: `tessera.connect("my.model").predict(x)` calls a module through a node's HTTP
gateway (see tessera.client).

numpy is needed only for tensors.
"""

from .client import CallError, Client, Handle, Queue, connect
from .task import ContextError, Dataset, Inputs, Task, expose

__version__ = "0.1.0"

__all__ = [
    "CallError",
    "Client",
    "ContextError",
    "Dataset",
    "Handle",
    "Inputs",
    "Queue",
    "Task",
    "connect",
    "expose",
]
