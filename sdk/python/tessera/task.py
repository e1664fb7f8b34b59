"""What a module's code sees: the Task base class, @expose, and the task context.

A module file defines one subclass of Task. The host (`python -m tessera.host`) creates
one instance per process and calls its exposed methods; while a call runs, the instance
reaches its node through `self.local` (datasets, resources, state), `self.world` (the
run's globals and results) and `self.log`.
"""

import json

# The channel to the node while the host runs (set by tessera.host); None otherwise.
_channel = None

# Largest dataset read asked for in one request.
READ_CHUNK = 4 << 20


def _set_channel(channel):
    global _channel
    _channel = channel


class Blobs(dict):
    """A reply's blobs by name, with `ordered`: their bytes in the order sent."""

    def __init__(self, pairs=()):
        pairs = list(pairs)
        super().__init__(pairs)
        self.ordered = [v for _, v in pairs]


class ContextError(Exception):
    """A request to the node failed (unknown dataset, world state error, no context)."""


def _request(op, blobs=(), **fields):
    if _channel is None:
        raise ContextError("no task context: %s is only available while the node runs a call" % op)
    return _channel.request(op, blobs=blobs, **fields)


def expose(fn=None, *, name=None):
    """Marks a method as callable from outside, optionally under another name.

    `@expose`, `@expose()`, `@expose("alias")` and `@expose(name="alias")` all work; a
    method whose name starts with "_" is exposed only this way.
    """
    if isinstance(fn, str) and name is None:
        name, fn = fn, None

    def mark(f):
        target = f.__func__ if isinstance(f, (staticmethod, classmethod)) else f
        target.__tessera_expose__ = name or target.__name__
        return f

    return mark(fn) if fn is not None else mark


def encode_value(value):
    """bytes stay bytes; anything else is stored as JSON text (numpy values converted)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return json.dumps(value, default=json_default, allow_nan=False).encode("utf-8")


def decode_value(data):
    """The JSON value the bytes hold, or the bytes themselves when they are not JSON."""
    data = bytes(data)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return data


def json_default(o):
    """json.dumps hook: numpy arrays and scalars become lists and Python numbers."""
    if type(o).__module__ == "numpy" and hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError("%s is not JSON-serializable" % type(o).__name__)


class Inputs(dict):
    """A call's inputs by name.

    In a swarm, the outputs of the stages feeding a task arrive named `<output>@<node>`
    (the node that produced them), decoded as they were returned (JSON values as values,
    safetensors as arrays, other bytes as bytes). `inputs["model"]` is then the `model` output when
    exactly one node sent one; `inputs.select("model")` gives every node's, as
    [(node, value)] sorted by node, as `world.results.select` does.
    """

    def __init__(self, pairs=()):
        super().__init__()
        self._by_node = {}
        for name, value in pairs:
            base, sep, node = name.rpartition("@")
            if sep and base and node:
                # What an earlier stage returned: JSON values come back as values.
                if isinstance(value, (bytes, bytearray)):
                    value = decode_value(value)
                self._by_node.setdefault(base, []).append((node, value))
            dict.__setitem__(self, name, value)
        for base, items in self._by_node.items():
            items.sort(key=lambda p: p[0])
            if len(items) == 1 and base not in self:
                dict.__setitem__(self, base, items[0][1])

    def select(self, name):
        """Every node's input `name`, as [(node, value)] sorted by node (a plain input
        gives [(None, value)])."""
        if name in self._by_node:
            return list(self._by_node[name])
        if name in self:
            return [(None, self[name])]
        return []


class Dataset:
    """A dataset of the node, read-only. Read it in chunks; it may be large."""

    def __init__(self, name):
        self.name = name
        self._size = None

    def __repr__(self):
        return "Dataset(%r)" % self.name

    @property
    def size(self):
        """Its size in bytes."""
        if self._size is None:
            value, _ = _request("dataset_size", name=self.name)
            self._size = int(value)
        return self._size

    def read(self, offset, n):
        """Up to n bytes from offset (fewer at the end)."""
        out = []
        got = 0
        while got < n:
            want = min(n - got, READ_CHUNK)
            _, blobs = _request("dataset_read", name=self.name, offset=offset + got, len=want)
            data = blobs.get("data", b"")
            if not data:
                break
            out.append(bytes(data))
            got += len(data)
        return b"".join(out)

    def bytes(self):
        """The whole dataset (read in chunks of at most 4 MiB)."""
        size = self.size
        buf = bytearray()
        while len(buf) < size:
            chunk = self.read(len(buf), min(READ_CHUNK, size - len(buf)))
            if not chunk:
                break
            buf += chunk
        return bytes(buf)

    def tensors(self):
        """The dataset read as a safetensors file: dict name -> numpy array."""
        from . import safetensors

        return safetensors.decode(bytearray(self.bytes()))


class Local:
    """The node: its datasets and resources, and this process's persistent state."""

    def __init__(self):
        # Saved by save_state and put back by restore_state when the class is `stateful`.
        self.state = {}

    def dataset(self, name):
        """A dataset by name."""
        return Dataset(name)

    def datasets(self):
        """Names of the datasets this task may read."""
        value, _ = _request("datasets")
        return list(value or [])

    def resources(self):
        """The node's resources (cpu, memory, gpu, disk)."""
        value, _ = _request("resources")
        return dict(value or {})


class Globals:
    """The run's globals: bytes or JSON values by key."""

    def get(self, key, default=None):
        """The value under key, or default."""
        _, blobs = _request("globals_get", key=key)
        if "value" not in blobs:
            return default
        return decode_value(blobs["value"])

    def get_bytes(self, key, default=None):
        """The raw bytes under key, or default."""
        _, blobs = _request("globals_get", key=key)
        return bytes(blobs["value"]) if "value" in blobs else default

    def set(self, key, value):
        """Stores value (bytes as they are, anything else as JSON)."""
        _request("globals_set", blobs=[("value", "bytes", encode_value(value))], key=key)

    def __getitem__(self, key):
        missing = object()
        value = self.get(key, missing)
        if value is missing:
            raise KeyError(key)
        return value

    def __setitem__(self, key, value):
        self.set(key, value)

    def __contains__(self, key):
        _, blobs = _request("globals_get", key=key)
        return "value" in blobs


class Results:
    """The run's results: every node adds its own under a key."""

    def add(self, key, value):
        """Adds this node's result under key (bytes as they are, anything else as JSON)."""
        _request("results_add", blobs=[("value", "bytes", encode_value(value))], key=key)

    def select(self, key):
        """Every node's result under key, as [(node, value)]."""
        nodes, blobs = _request("results_select", key=key)
        return [(node, decode_value(v)) for node, v in zip(nodes or [], blobs.ordered)]


class World:
    """The run's shared state."""

    def __init__(self):
        self.globals = Globals()
        self.results = Results()


class Log:
    """The task's log (goes to the node's log, attributed to the task)."""

    def _send(self, level, message):
        message = str(message)
        if _channel is None:
            import sys

            print("[%s] %s" % (level, message), file=sys.stderr)
        else:
            _channel.log(level, message)

    def trace(self, message):
        """Very detailed."""
        self._send("trace", message)

    def debug(self, message):
        """Detailed."""
        self._send("debug", message)

    def info(self, message):
        """Normal."""
        self._send("info", message)

    def warning(self, message):
        """Something odd."""
        self._send("warn", message)

    warn = warning

    def error(self, message):
        """Something failed."""
        self._send("error", message)


class Task:
    """Base class of a module's code.

    Define one subclass in the module file. Its public methods (and those marked with
    @expose) are the functions callers can call; `run(self)` is the task entry point;
    `setup(self)`, if defined, runs once before the first call. Set `stateful = True` to
    have `self.local.state` saved after calls and restored into new replicas (or define
    `save_state(self) -> bytes` and `restore_state(self, state: bytes)`).
    """

    stateful = False

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self.local = Local()
        self.world = World()
        self.log = Log()
        # The current call's config and decoded inputs.
        self.config = {}
        self.inputs = Inputs()
        return self
