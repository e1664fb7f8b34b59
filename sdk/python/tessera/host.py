"""Runs a module file as a Tessera process: `python -m tessera.host path/to/model.py`.

The node starts this with the module folder as working directory and speaks the frame
protocol (docs/protocol.md) over stdin and stdout. The host takes those two streams for
itself: `sys.stdout` and file descriptor 1 are pointed at stderr (so `print()` goes to the
node's log) and stdin at /dev/null.

Exit codes: 0 after `shutdown` or when the node closes stdin; 1 when the module cannot be
loaded; 2 on a protocol error.
"""

import importlib.util
import json
import os
import sys
import threading
import types

# inspect, pickle, traceback and typing are imported where they are used: a module
# process starts (and says hello) without paying for them.

from . import protocol
from . import safetensors
from . import task as _task
from .task import Blobs, ContextError, Inputs, Task, json_default

HOOKS = ("save_state", "restore_state")
RESERVED = frozenset(("setup",) + HOOKS)
# Argument annotations checked before a call (others are left to the function).
SIMPLE_TYPES = (int, float, str, bool, list, dict, bytes)


class LoadError(Exception):
    """The module file cannot be turned into a task."""


class CallFailure(Exception):
    """A call ends with an `error` message of this kind."""

    def __init__(self, kind, message, tb=""):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.tb = tb


def load_module(path):
    """Imports a module file (its folder goes first on sys.path)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise LoadError("no such module file: %s" % path)
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = os.path.splitext(os.path.basename(path))[0]
    if not name.isidentifier() or name in sys.modules:
        name = "__tessera_module__"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def find_task_class(module, wanted=None):
    """The Task subclass a module file defines (by name when several)."""
    classes = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, Task) and obj is not Task and obj.__module__ == module.__name__
    ]
    names = ", ".join(sorted(c.__name__ for c in classes))
    if wanted:
        for c in classes:
            if c.__name__ == wanted:
                return c
        raise LoadError("no Task subclass named %r in the module (found: %s)" % (wanted, names or "none"))
    if not classes:
        raise LoadError("the module defines no subclass of tessera.Task")
    if len(classes) > 1:
        raise LoadError("the module defines several Task subclasses (%s); set config.class to one of them" % names)
    return classes[0]


def exposed_functions(cls):
    """The functions a Task subclass exposes: {exposed name: attribute name}.

    Public methods defined on Task subclasses in the class hierarchy (not on Task itself,
    not setup or the state hooks), plus methods marked with @expose anywhere in it.
    """
    out = {}
    for klass in reversed(cls.__mro__):
        if klass is Task or klass is object:
            continue
        user = issubclass(klass, Task)
        for attr, raw in vars(klass).items():
            # A redefinition replaces what a base class exposed under this attribute.
            for name in [n for n, a in out.items() if a == attr]:
                del out[name]
            fn = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
            if not isinstance(fn, types.FunctionType):
                continue
            mark = getattr(fn, "__tessera_expose__", None)
            if mark:
                out[mark] = attr
            elif user and not attr.startswith("_") and attr not in RESERVED:
                out[attr] = attr
    return out


def state_hooks(cls):
    """The state hooks a class offers: its own save_state/restore_state, or both when stateful."""
    return [h for h in HOOKS if callable(getattr(cls, h, None)) or getattr(cls, "stateful", False)]


def is_ndarray(value):
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


def to_json(value):
    """JSON bytes of a result (numpy values converted); CallFailure if impossible."""
    try:
        return json.dumps(value, default=json_default, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise CallFailure("exception", "the result is not JSON-serializable: %s" % e)


def encode_output(name, value):
    """One output: ndarray -> tensor (safetensors, tensor "data"), safetensors.Parts ->
    tensor, bytes -> bytes, else JSON. Arrays and parts are written without copies."""
    if is_ndarray(value):
        return (name, "tensor", safetensors.encode_parts({"data": value}))
    if isinstance(value, safetensors.Parts):
        return (name, "tensor", value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (name, "bytes", bytes(value))
    return (name, "json", to_json(value))


def encode_result(value, from_run=False):
    """A call's outputs from what the function returned.

    A dict returned by run() maps output names to values (a task's named outputs, such as
    {"model": ..., "metrics": ...}); any other value, and anything an exposed function
    returns, is the single output "result".
    """
    if from_run and isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        return [encode_output(k, v) for k, v in value.items()]
    return [encode_output("result", value)]


def decode_input(kind, data):
    """An input blob as the function sees it: tensor -> ndarray (or dict of them), json -> value, bytes -> bytes."""
    if kind == "tensor":
        tensors = safetensors.decode(data)
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        return tensors
    if kind == "json":
        return json.loads(bytes(data).decode("utf-8"))
    return bytes(data)


def _user_traceback(exc):
    """The exception's traceback without the host's own frames or the import machinery's."""
    import traceback

    here = os.path.abspath(__file__)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith("<frozen ") and os.path.abspath(f.filename) != here
    ]
    text = "".join(traceback.format_exception_only(type(exc), exc))
    if frames:
        text = "Traceback (most recent call last):\n" + "".join(traceback.format_list(frames)) + text
    return text


def _describe(exc):
    text = str(exc)
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__


def check_types(function, method, sig, bound):
    """bad_args when an argument annotated with a simple type (int, float, str, bool,
    list, dict, bytes) gets a value of another type (an int is a float; a bool is not an int)."""
    import typing

    try:
        hints = typing.get_type_hints(method)
    except Exception:
        return
    for name, value in bound.arguments.items():
        expected = hints.get(name)
        if expected not in SIMPLE_TYPES:
            continue
        param = sig.parameters[name]
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        ok = isinstance(value, expected)
        if expected is float and isinstance(value, int):
            ok = not isinstance(value, bool)
        if expected is int and isinstance(value, bool):
            ok = False
        if not ok:
            raise CallFailure(
                "bad_args",
                "bad arguments for %s%s: %s must be %s, not %s"
                % (function, sig, name, expected.__name__, type(value).__name__),
            )


class Host:
    """Serves one task instance over a pair of binary streams."""

    def __init__(self, rfile, wfile, instance):
        self.rfile = rfile
        self.wfile = wfile
        self.instance = instance
        cls = type(instance)
        self.functions = exposed_functions(cls)
        self.hooks = state_hooks(cls)
        self.setup_done = not callable(getattr(instance, "setup", None))
        self.lock = threading.RLock()
        self.next_request = 0
        self.call_id = None

    # --- the channel used by tessera.task while a call runs ---

    def request(self, op, blobs=(), **fields):
        """Sends a context request and waits for its reply: (value, Blobs)."""
        with self.lock:
            if self.call_id is None:
                raise ContextError("no task context: %s is only available while a call runs" % op)
            self.next_request += 1
            rid = self.next_request
            header = {"type": "ctx", "id": rid, "op": op}
            header.update(fields)
            self._write(header, list(blobs))
            frame = self._read()
            if frame is None:
                _fatal("the node closed the channel during a context request")
            h, data = frame
            if h.get("type") != "ctx_reply" or h.get("id") != rid:
                _fatal("expected ctx_reply %d, got %r (id %r)" % (rid, h.get("type"), h.get("id")))
            if not h.get("ok"):
                raise ContextError(h.get("error") or "the context request %s failed" % op)
            pairs = [(spec["name"], bytes(b)) for spec, b in zip(h.get("blobs") or [], data)]
            return h.get("value"), Blobs(pairs)

    def log(self, level, message):
        """Sends a log line (no reply); outside a call it goes to stderr."""
        with self.lock:
            if self.call_id is None:
                print("[%s] %s" % (level, message), file=sys.stderr)
                return
            self.next_request += 1
            self._write({"type": "ctx", "id": self.next_request, "op": "log", "level": level, "message": message})

    # --- the serve loop ---

    def _write(self, header, blobs=()):
        try:
            protocol.write_frame(self.wfile, header, blobs)
        except (BrokenPipeError, ConnectionError):
            _fatal("the node closed the channel", code=0)

    def _read(self):
        try:
            return protocol.read_frame(self.rfile)
        except protocol.ProtocolError as e:
            _fatal("protocol error: %s" % e)

    def hello(self):
        self._write(
            {
                "type": "hello",
                "protocol": protocol.PROTOCOL_VERSION,
                "functions": sorted(self.functions),
                "hooks": self.hooks,
            }
        )

    def serve(self):
        """Says hello, then answers calls until shutdown or end of input. Returns the exit code."""
        self.hello()
        while True:
            frame = self._read()
            if frame is None:
                return 0
            header, blobs = frame
            kind = header["type"]
            if kind == "call":
                self.handle_call(header, blobs)
            elif kind == "shutdown":
                return 0
            else:
                _fatal("unexpected message %r" % kind)

    def handle_call(self, header, blobs):
        cid = header.get("id")
        with self.lock:
            self.call_id = cid
        try:
            outputs = self.dispatch(header, blobs)
        except CallFailure as f:
            reply, outputs = {"type": "error", "id": cid, "kind": f.kind, "message": f.message, "traceback": f.tb}, []
        else:
            reply = {"type": "result", "id": cid}
        finally:
            with self.lock:
                self.call_id = None
        self._write(reply, outputs)

    def _setup(self):
        if self.setup_done:
            return
        try:
            self.instance.setup()
        except Exception as e:
            raise CallFailure("exception", "setup failed: %s" % _describe(e), _user_traceback(e))
        self.setup_done = True

    def dispatch(self, header, blobs):
        """Runs one call; returns the outputs [(name, kind, bytes)] or raises CallFailure."""
        function = header.get("function") or "run"
        args = header.get("args")
        kwargs = header.get("kwargs")
        args = [] if args is None else args
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(args, list):
            raise CallFailure("bad_args", "args must be a list")
        if not isinstance(kwargs, dict):
            raise CallFailure("bad_args", "kwargs must be a mapping")
        specs = header.get("blobs") or []
        raw = {spec["name"]: blob for spec, blob in zip(specs, blobs)}
        inst = self.instance
        inst.config = header.get("config") or {}

        if function in HOOKS:
            if function not in self.hooks:
                raise self._unknown(function)
            inst.inputs = Inputs()
            self._setup()
            return self._hook(function, raw)

        attr = self.functions.get(function)
        if attr is None:
            raise self._unknown(function)
        pairs = []
        for spec, blob in zip(specs, blobs):
            try:
                pairs.append((spec["name"], decode_input(spec.get("kind", "bytes"), blob)))
            except Exception as e:
                raise CallFailure("exception", "cannot decode input %r: %s" % (spec["name"], _describe(e)))
        inputs = Inputs(pairs)
        inst.inputs = inputs
        method = getattr(inst, attr)
        import inspect

        try:
            sig = inspect.signature(method)
        except (TypeError, ValueError):
            sig = None
        call_kwargs = dict(kwargs)
        for name, value in inputs.items():
            if function == "run" and sig is not None and not _accepts(sig, name):
                continue  # run() reads it from self.inputs
            if name in call_kwargs:
                raise CallFailure("bad_args", "input %r is also given as a keyword argument" % name)
            call_kwargs[name] = value
        if sig is not None:
            try:
                bound = sig.bind(*args, **call_kwargs)
            except TypeError as e:
                raise CallFailure("bad_args", "bad arguments for %s%s: %s" % (function, sig, e))
            check_types(function, method, sig, bound)
        self._setup()
        try:
            result = method(*args, **call_kwargs)
        except Exception as e:
            raise CallFailure("exception", _describe(e), _user_traceback(e))
        return encode_result(result, from_run=(function == "run"))

    def _unknown(self, function):
        names = ", ".join(sorted(self.functions)) or "none"
        return CallFailure("unknown_function", 'unknown function "%s" (exposed: %s)' % (function, names))

    def _hook(self, function, raw):
        import pickle

        inst = self.instance
        custom = callable(getattr(type(inst), function, None))
        try:
            if function == "save_state":
                data = inst.save_state() if custom else pickle.dumps(inst.local.state, protocol=4)
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise CallFailure("exception", "save_state must return bytes, not %s" % type(data).__name__)
                return [("state", "bytes", bytes(data))]
            if "state" not in raw:
                raise CallFailure("bad_args", 'restore_state needs an input named "state"')
            state = bytes(raw["state"])
            if custom:
                inst.restore_state(state)
            else:
                value = pickle.loads(state)
                if not isinstance(value, dict):
                    raise CallFailure("exception", "the saved state is a %s, not a dict" % type(value).__name__)
                inst.local.state.clear()
                inst.local.state.update(value)
            return [("result", "json", b"null")]
        except CallFailure:
            raise
        except Exception as e:
            raise CallFailure("exception", "%s failed: %s" % (function, _describe(e)), _user_traceback(e))


def _accepts(sig, name):
    for p in sig.parameters.values():
        if p.kind == p.VAR_KEYWORD:
            return True
        if p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            return True
    return False


def _fatal(message, code=2):
    """Ends the process at once (the channel is unusable)."""
    try:
        print("tessera.host: %s" % message, file=sys.stderr, flush=True)
    finally:
        os._exit(code)


def _take_stdio():
    """The protocol streams; fd 0 becomes /dev/null and fd 1 (and sys.stdout) stderr."""
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(in_fd, "rb", buffering=1 << 16), os.fdopen(out_fd, "wb", buffering=1 << 16)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tessera.host <module file>", file=sys.stderr)
        return 2
    rfile, wfile = _take_stdio()
    try:
        module = load_module(argv[0])
        cls = find_task_class(module, os.environ.get("TESSERA_CLASS") or None)
        instance = cls()
    except LoadError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    except BaseException as e:
        print(_user_traceback(e), end="", file=sys.stderr)
        return 1
    host = Host(rfile, wfile, instance)
    _task._set_channel(host)
    return host.serve()


if __name__ == "__main__":
    sys.exit(main())
