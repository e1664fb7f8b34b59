"""A client for a node's HTTP gateway, with only the standard library (numpy for tensors).

    import tessera
    model = tessera.connect("demo.iris")          # or tessera.Client(endpoint).connect(...)
    labels = model.predict(x=features, k=1)        # numpy keyword arguments travel as tensors
    labels = model.options(timeout=5).predict(x=features)

One HTTP connection is kept alive per Client (and reopened when the server closed it).
"""

import base64
import http.client
import json
import os
import threading
import urllib.parse

from . import safetensors

DEFAULT_ENDPOINT = "http://127.0.0.1:7710"
API = "/api/v1"


class CallError(Exception):
    """The gateway refused a request or the call failed: `kind` says how (`not_found`,
    `module`, `time_limit`, `http`, ...), `message` says why, `status` is the HTTP status."""

    def __init__(self, kind, message, status=None):
        super().__init__("%s: %s" % (kind, message))
        self.kind = kind
        self.message = message
        self.status = status


def _is_ndarray(value):
    import sys

    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


class Response:
    """A call's answer: the actor and node that ran it, the JSON result, and the outputs'
    descriptions (`{"name": {"size", "kind", "inline" | "digest"}}`)."""

    def __init__(self, client, body):
        self._client = client
        self.actor = body.get("actor")
        self.node = body.get("node")
        self.result = body.get("result")
        self.outputs = body.get("outputs") or {}

    def output_bytes(self, name):
        """The raw bytes of an output (inline, or fetched from the blob store)."""
        out = self.outputs.get(name)
        if out is None:
            raise KeyError(name)
        if out.get("inline") is not None:
            return base64.b64decode(out["inline"])
        if out.get("digest"):
            return self._client.blob(out["digest"])
        if out.get("size", 0) == 0:
            return b""
        raise CallError("protocol", "output %r has neither inline bytes nor a digest" % name)

    def output(self, name):
        """An output decoded by its kind: JSON value, numpy array (or dict of them), or bytes."""
        out = self.outputs.get(name)
        if out is None:
            raise KeyError(name)
        kind = out.get("kind", "bytes")
        if kind == "json" and name == "result" and out.get("inline") is None and not out.get("digest"):
            return self.result
        data = self.output_bytes(name)
        if kind == "json":
            return json.loads(data.decode("utf-8"))
        if kind == "tensor":
            tensors = safetensors.decode(data)
            return next(iter(tensors.values())) if len(tensors) == 1 else tensors
        return data

    def value(self):
        """What a call returns: `result` when the output "result" is JSON (or absent), else
        the decoded "result" output."""
        out = self.outputs.get("result")
        if out is None or out.get("kind", "json") == "json":
            return self.result
        return self.output("result")


class Handle:
    """A module (or actor) to call: attribute access gives its functions."""

    def __init__(self, client, module, timeout=None):
        self._client = client
        self._module = module
        self._timeout = timeout

    def __repr__(self):
        return "Handle(%r)" % self._module

    def options(self, timeout=None):
        """The same module with call options (timeout in seconds)."""
        return Handle(self._client, self._module, timeout=timeout)

    def __getattr__(self, function):
        if function.startswith("_"):
            raise AttributeError(function)

        def call(*args, **kwargs):
            return self.invoke(function, *args, **kwargs).value()

        call.__name__ = function
        return call

    def request_body(self, function, args, kwargs):
        """The JSON body of a call: numpy keyword arguments go to `inputs` as safetensors
        (tensor "data", base64), the rest to `kwargs`."""
        for i, a in enumerate(args):
            if _is_ndarray(a):
                raise TypeError(
                    "argument %d of %s() is a numpy array: pass arrays by keyword (%s(x=array)) so they travel as tensors"
                    % (i, function, function)
                )
        plain, inputs = {}, {}
        for k, v in kwargs.items():
            if _is_ndarray(v):
                inputs[k] = base64.b64encode(safetensors.encode({"data": v})).decode("ascii")
            else:
                plain[k] = v
        body = {"module": self._module, "function": function, "args": list(args), "kwargs": plain, "inputs": inputs}
        if self._timeout is not None:
            body["timeout"] = self._timeout
        return body

    def invoke(self, function, *args, **kwargs):
        """Calls a function and returns the whole Response."""
        body = self.request_body(function, args, kwargs)
        http_timeout = None if self._timeout is None else self._timeout + self._client.timeout
        answer = self._client.request_json("POST", API + "/call", body, timeout=http_timeout)
        return Response(self._client, answer)


class Queue:
    """A named queue on the bus, through the gateway."""

    def __init__(self, client, name):
        self._client = client
        self.name = name
        self._path = API + "/queues/" + urllib.parse.quote(name, safe="")

    def put(self, value):
        """Puts a JSON value."""
        self._client.request_json("POST", self._path, value)

    def get(self, wait=1.0):
        """Takes a value, waiting up to `wait` seconds; None when the queue stays empty."""
        path = "%s/get?%s" % (self._path, urllib.parse.urlencode({"wait": wait}))
        status, data = self._client.request("POST", path, None, timeout=wait + self._client.timeout)
        if status == 204 or not data:
            return None
        return json.loads(data.decode("utf-8"))

    def __len__(self):
        return int(self._client.request_json("GET", self._path)["len"])


class Client:
    """A node's HTTP gateway at `endpoint` (default: $TESSERA_ENDPOINT, else
    http://127.0.0.1:7710). `timeout` is the socket timeout in seconds."""

    def __init__(self, endpoint=None, timeout=60.0):
        endpoint = endpoint or os.environ.get("TESSERA_ENDPOINT") or DEFAULT_ENDPOINT
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("endpoint must be an http(s) URL, not %r" % endpoint)
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._base = parts.path.rstrip("/")
        self._conn = None
        self._lock = threading.Lock()

    def __repr__(self):
        return "Client(%r)" % self.endpoint

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Closes the kept-alive connection."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _connection(self):
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
        return self._conn

    def request(self, method, path, body=None, timeout=None):
        """Sends a request (body: a JSON value, or None) and returns (status, bytes)."""
        data = None if body is None else json.dumps(body, allow_nan=False).encode("utf-8")
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        with self._lock:
            for attempt in (0, 1):
                reused = self._conn is not None
                conn = self._connection()
                conn.timeout = timeout or self.timeout
                if conn.sock is not None:
                    conn.sock.settimeout(conn.timeout)
                try:
                    conn.request(method, self._base + path, body=data, headers=headers)
                    resp = conn.getresponse()
                    payload = resp.read()
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                    conn.close()
                    self._conn = None
                    # A kept-alive connection the server had closed: try once more on a new one.
                    if reused and attempt == 0:
                        continue
                    raise
                except BaseException:
                    conn.close()
                    self._conn = None
                    raise
                if resp.will_close:
                    conn.close()
                    self._conn = None
                return resp.status, payload
        raise AssertionError("unreachable")

    def request_json(self, method, path, body=None, timeout=None):
        """Sends a request and decodes the JSON answer; raises CallError for HTTP errors."""
        status, payload = self.request(method, path, body, timeout=timeout)
        if status >= 400:
            raise _error(status, payload)
        if not payload:
            return None
        return json.loads(payload.decode("utf-8"))

    def connect(self, name):
        """A handle on a module or actor: `client.connect("demo.iris").predict(x=...)`."""
        return Handle(self, name)

    def launch(self, module, tag=None, replicas=1, config=None, priority=0):
        """Launches (or finds) an actor; returns the gateway's answer."""
        body = {"module": module, "tag": tag, "replicas": replicas, "config": config, "priority": priority}
        return self.request_json("POST", API + "/actors", body)

    def actors(self):
        """The running actors."""
        return self.request_json("GET", API + "/actors")

    def kill(self, name):
        """Stops an actor."""
        return self.request_json("DELETE", API + "/actors/" + urllib.parse.quote(name, safe=""))

    def queue(self, name):
        """A named queue."""
        return Queue(self, name)

    def blob(self, digest):
        """The bytes of a blob by digest (`b3:...`)."""
        status, payload = self.request("GET", API + "/blobs/" + urllib.parse.quote(digest, safe=":"))
        if status >= 400:
            raise _error(status, payload)
        return payload


def _error(status, payload):
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        body = None
    if isinstance(body, dict) and "error" in body:
        return CallError(str(body.get("kind") or "error"), str(body["error"]), status)
    text = payload[:200].decode("utf-8", "replace")
    return CallError("http", "HTTP %d: %s" % (status, text), status)


def connect(name, endpoint=None):
    """A handle on a module through the gateway at `endpoint` (default: $TESSERA_ENDPOINT)."""
    return Client(endpoint).connect(name)
