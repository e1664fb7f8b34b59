"""Tessera's Python SDK.

Module side: subclass `tessera.Task` in a module file; the node runs it with
`python -m tessera.host model.py` (see tessera.task and tessera.host).

Swarms: `tessera.swarm` declares tasks, where they run and their flow (Manta's Swarm,
Task and Module), for `tessera swarm run swarm.py`.

Client side: `tessera.connect("my.model").predict(x)` calls a module through a node's HTTP
gateway (see tessera.client).

numpy is needed only for tensors.
"""

from .task import ContextError, Dataset, Inputs, Task, expose

# The client (http.client, ssl: most of the SDK's import time) loads on first use, so a
# module process, which never calls out, starts without it (PEP 562).
_CLIENT = ("CallError", "Client", "Handle", "Queue", "connect")


def __getattr__(name):
    if name in _CLIENT:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'tessera' has no attribute {name!r}")


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
