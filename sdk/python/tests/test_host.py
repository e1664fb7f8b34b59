import json
import os
import subprocess
import sys
import tempfile
import textwrap
import unittest

import _path

import tessera
from tessera import host, protocol, safetensors


class Base(tessera.Task):
    def inherited(self):
        return "base"


class Model(Base):
    stateful = True

    def setup(self):
        self.ready = True

    def predict(self, x, k: int = 1):
        return [x, k]

    def _hidden(self):
        pass

    @tessera.expose
    def _shown(self):
        pass

    @tessera.expose(name="alias")
    def renamed(self):
        pass

    @staticmethod
    def helper():
        return 1

    value = 3


class Plain(tessera.Task):
    def save_state(self):
        return b""


class DispatchRulesTest(unittest.TestCase):
    def test_exposed_functions(self):
        funcs = host.exposed_functions(Model)
        self.assertEqual(sorted(funcs), ["_shown", "alias", "helper", "inherited", "predict"])
        self.assertEqual(funcs["alias"], "renamed")

        class Child(Model):
            predict = None  # no longer a function

            def extra(self):
                pass

        self.assertEqual(sorted(host.exposed_functions(Child)), ["_shown", "alias", "extra", "helper", "inherited"])

    def test_state_hooks(self):
        self.assertEqual(host.state_hooks(Model), ["save_state", "restore_state"])
        self.assertEqual(host.state_hooks(Plain), ["save_state"])
        self.assertEqual(host.state_hooks(Base), [])

    def test_class_choice(self):
        mod = type(sys)("m")
        self.assertRaisesRegex(host.LoadError, "no subclass", host.find_task_class, mod)
        for c in (Model, Plain):
            c.__module__ = "m"
            setattr(mod, c.__name__, c)
        try:
            self.assertRaisesRegex(host.LoadError, r"several Task subclasses \(Model, Plain\)", host.find_task_class, mod)
            self.assertIs(host.find_task_class(mod, "Plain"), Plain)
            self.assertRaisesRegex(host.LoadError, "no Task subclass named 'Nope'", host.find_task_class, mod, "Nope")
        finally:
            Model.__module__ = Plain.__module__ = __name__

    def test_results_without_numpy_types(self):
        self.assertEqual(host.encode_result(None), [("result", "json", b"null")])
        self.assertEqual(host.encode_result({"a": [1, 2.5]}), [("result", "json", b'{"a": [1, 2.5]}')])
        self.assertEqual(host.encode_result(b"\x00"), [("result", "bytes", b"\x00")])
        self.assertEqual(host.encode_result((1, 2)), [("result", "json", b"[1, 2]")])
        # A dict from run() with bytes values: one output per key; elsewhere it is JSON.
        self.assertEqual(
            host.encode_result({"model": b"m", "metrics": {"loss": 1}}, from_run=True),
            [("model", "bytes", b"m"), ("metrics", "json", b'{"loss": 1}')],
        )
        self.assertEqual(host.encode_result({"a": 1}, from_run=True), [("a", "json", b"1")])
        self.assertEqual(host.encode_result({"a": 1}), [("result", "json", b'{"a": 1}')])
        for bad in (float("nan"), object()):
            with self.assertRaises(host.CallFailure) as cm:
                host.encode_result(bad)
            self.assertEqual(cm.exception.kind, "exception")
            self.assertIn("not JSON-serializable", cm.exception.message)

    def test_results_with_numpy(self):
        np = _path.require_numpy()
        [(name, kind, data)] = host.encode_result(np.eye(2, dtype=np.float32))
        self.assertEqual((name, kind), ("result", "tensor"))
        np.testing.assert_array_equal(safetensors.decode(data)["data"], np.eye(2))
        out = host.encode_result({"n": np.int64(3), "v": np.array([1.5]), "f": np.float32(0.5)})
        self.assertEqual(json.loads(out[0][2]), {"n": 3, "v": [1.5], "f": 0.5})
        ins = host.decode_input("tensor", safetensors.encode({"a": np.ones(2), "b": np.zeros(1)}))
        self.assertEqual(sorted(ins), ["a", "b"])
        one = host.decode_input("tensor", safetensors.encode({"data": np.arange(3)}))
        self.assertEqual(one.tolist(), [0, 1, 2])
        self.assertEqual(host.decode_input("bytes", bytearray(b"ab")), b"ab")
        self.assertEqual(host.decode_input("json", b'{"a": 1}'), {"a": 1})


MODULE = textwrap.dedent(
    '''
    import tessera

    class Echo(tessera.Task):
        stateful = True

        def echo(self, value, *, twice: bool = False):
            print("not on the channel")
            return [value, value] if twice else value

        def remember(self, key):
            self.local.state[key] = self.world.globals.get(key)
            return self.local.state

        def boom(self):
            raise KeyError("missing")

        def blob(self, data):
            return data[::-1]
    '''
)


class HostProcessTest(unittest.TestCase):
    """`python -m tessera.host` in a child process, driven through the protocol."""

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)
        path = os.path.join(self.dir.name, "model.py")
        with open(path, "w") as f:
            f.write(MODULE)
        env = dict(os.environ, PYTHONPATH=_path.SDK, PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "tessera.host", path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.dir.name,
            env=env,
        )
        self.addCleanup(self._stop)

    def _stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for s in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            s.close()

    def send(self, header, blobs=()):
        protocol.write_frame(self.proc.stdin, header, blobs)

    def recv(self):
        return protocol.read_frame(self.proc.stdout)

    def call(self, function, args=(), kwargs=None, blobs=(), id=1):
        self.send({"type": "call", "id": id, "function": function, "args": list(args), "kwargs": kwargs or {}, "config": {}}, blobs)
        return self.recv()

    def test_a_session(self):
        hello, _ = self.recv()
        self.assertEqual(hello, {"type": "hello", "protocol": 1, "functions": ["blob", "boom", "echo", "remember"], "hooks": ["save_state", "restore_state"]})

        h, blobs = self.call("echo", ["hi"], {"twice": True})
        self.assertEqual((h["type"], h["id"], h["blobs"]), ("result", 1, [{"name": "result", "len": 12, "kind": "json"}]))
        self.assertEqual(json.loads(blobs[0]), ["hi", "hi"])

        h, _ = self.call("echo", ["hi"], {"twice": "yes"}, id=2)
        self.assertEqual((h["type"], h["kind"]), ("error", "bad_args"))
        self.assertIn("twice must be bool, not str", h["message"])

        h, _ = self.call("nope", id=3)
        self.assertEqual(h["kind"], "unknown_function")
        self.assertEqual(h["message"], 'unknown function "nope" (exposed: blob, boom, echo, remember)')

        h, _ = self.call("boom", id=4)
        self.assertEqual((h["kind"], h["message"]), ("exception", "KeyError: 'missing'"))
        self.assertIn('model.py", line', h["traceback"])
        self.assertNotIn("host.py", h["traceback"])

        h, blobs = self.call("blob", blobs=[("data", "bytes", b"abc")], id=5)
        self.assertEqual((h["blobs"][0]["kind"], bytes(blobs[0])), ("bytes", b"cba"))

        # A context request while a call runs.
        self.send({"type": "call", "id": 6, "function": "remember", "args": ["lr"], "kwargs": {}, "config": {}})
        req, _ = self.recv()
        self.assertEqual((req["type"], req["op"], req["key"]), ("ctx", "globals_get", "lr"))
        self.send({"type": "ctx_reply", "id": req["id"], "ok": True, "value": None}, [("value", "bytes", b"0.25")])
        h, blobs = self.recv()
        self.assertEqual((h["type"], h["id"]), ("result", 6))
        self.assertEqual(json.loads(blobs[0]), {"lr": 0.25})

        h, blobs = self.call("save_state", id=7)
        self.assertEqual(h["blobs"][0]["name"], "state")
        h, _ = self.call("restore_state", blobs=[("state", "bytes", blobs[0])], id=8)
        self.assertEqual(h["type"], "result")

        self.send({"type": "shutdown"})
        self.assertEqual(self.proc.wait(timeout=60), 0)
        self.assertIn(b"not on the channel", self.proc.stderr.read())

    def test_garbage_from_the_node_ends_the_process(self):
        self.recv()
        self.proc.stdin.write(b"\x00\x00\x00\x03abc")
        self.proc.stdin.flush()
        self.assertEqual(self.proc.wait(timeout=60), 2)
        self.assertIn(b"protocol error", self.proc.stderr.read())

    def test_end_of_input_ends_the_process(self):
        self.recv()
        self.proc.stdin.close()
        self.assertEqual(self.proc.wait(timeout=60), 0)


if __name__ == "__main__":
    unittest.main()
