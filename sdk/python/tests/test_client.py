import base64
import http.server
import json
import os
import threading
import unittest
from unittest import mock

import _path

import tessera
from tessera import safetensors


class Gateway(http.server.BaseHTTPRequestHandler):
    """Records requests; answers with the next canned (status, body, headers) of the server."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append(
            {
                "method": self.command,
                "path": self.path,
                "body": json.loads(body) if body else None,
                "content_type": self.headers.get("Content-Type"),
                "peer": self.client_address,
            }
        )
        status, payload, headers = self.server.answers.pop(0)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status != 204:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if status != 204:
            self.wfile.write(data)
        if self.server.drop_after_answer:
            # Close the kept-alive connection without telling the client.
            self.close_connection = True

    do_GET = do_POST = do_DELETE = _handle


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
        self.server.requests = []
        self.server.answers = []
        self.server.drop_after_answer = False
        self.server.daemon_threads = True
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        self.endpoint = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.client = tessera.Client(self.endpoint, timeout=30)
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.addCleanup(self.client.close)

    def answer(self, status, body, headers=None):
        self.server.answers.append((status, body, headers))

    def ok(self, result=None, outputs=None):
        return {"actor": "demo.iris", "node": "node-a", "result": result, "outputs": outputs or {}}

    def test_a_call_with_json_arguments_and_result(self):
        self.answer(200, self.ok([1, 2], {"result": {"size": 6, "kind": "json", "inline": base64.b64encode(b"[1, 2]").decode()}}))
        self.assertEqual(self.client.connect("demo.iris").predict([0.1, 0.2], k=3), [1, 2])
        [req] = self.server.requests
        self.assertEqual((req["method"], req["path"], req["content_type"]), ("POST", "/api/v1/call", "application/json"))
        self.assertEqual(req["body"], {"module": "demo.iris", "function": "predict", "args": [[0.1, 2e-1]], "kwargs": {"k": 3}, "inputs": {}})

    def test_numpy_keyword_arguments_travel_as_tensors(self):
        np = _path.require_numpy()
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        y = np.array([[1.5, 2.5]], dtype=np.float32)
        inline = base64.b64encode(safetensors.encode({"data": y})).decode()
        self.answer(200, self.ok(None, {"result": {"size": 8, "kind": "tensor", "inline": inline}}))
        got = self.client.connect("demo.iris").options(timeout=5).predict(x=x, k=1)
        np.testing.assert_array_equal(got, y)
        body = self.server.requests[0]["body"]
        self.assertEqual(body["kwargs"], {"k": 1})
        self.assertEqual(body["timeout"], 5)
        sent = safetensors.decode(base64.b64decode(body["inputs"]["x"]))
        self.assertEqual(list(sent), ["data"])
        np.testing.assert_array_equal(sent["data"], x)
        with self.assertRaisesRegex(TypeError, "pass arrays by keyword"):
            self.client.connect("demo.iris").predict(x)

    def test_outputs_stored_as_blobs_are_fetched(self):
        np = _path.require_numpy()
        data = safetensors.encode({"w": np.ones(3), "b": np.zeros(1)})
        self.answer(200, self.ok(None, {"result": {"size": len(data), "kind": "tensor", "digest": "b3:abc"}}))
        self.answer(200, data)
        got = self.client.connect("m").train()
        self.assertEqual(sorted(got), ["b", "w"])
        self.assertEqual(self.server.requests[1]["method"], "GET")
        self.assertEqual(self.server.requests[1]["path"], "/api/v1/blobs/b3:abc")

    def test_bytes_results_and_whole_responses(self):
        self.answer(200, self.ok(None, {"result": {"size": 3, "kind": "bytes", "inline": base64.b64encode(b"\x00\x01\x02").decode()}}))
        self.assertEqual(self.client.connect("m").raw(), b"\x00\x01\x02")
        self.answer(200, self.ok({"n": 1}, {"result": {"size": 8, "kind": "json"}, "log": {"size": 2, "kind": "bytes", "inline": "b2s="}}))
        resp = self.client.connect("m").invoke("stats")
        self.assertEqual((resp.actor, resp.node, resp.value()), ("demo.iris", "node-a", {"n": 1}))
        self.assertEqual(resp.output("log"), b"ok")
        self.assertEqual(resp.output("result"), {"n": 1})
        self.answer(200, self.ok(None, {}))
        self.assertIsNone(self.client.connect("m").nothing())

    def test_errors_raise_call_error(self):
        self.answer(404, {"error": "no actor demo.x", "kind": "not_found"})
        with self.assertRaises(tessera.CallError) as cm:
            self.client.connect("demo.x").predict()
        self.assertEqual((cm.exception.kind, cm.exception.message, cm.exception.status), ("not_found", "no actor demo.x", 404))
        self.answer(500, b"<html>oops</html>")
        with self.assertRaises(tessera.CallError) as cm:
            self.client.actors()
        self.assertEqual(cm.exception.kind, "http")
        self.assertIn("HTTP 500", cm.exception.message)

    def test_actors_and_queues(self):
        self.answer(200, {"name": "demo.iris-a", "replicas": 2})
        self.answer(200, [{"name": "demo.iris-a"}])
        self.answer(200, {"killed": True})
        self.answer(200, {})
        self.answer(200, {"x": 1})
        self.answer(204, b"")
        self.answer(200, {"len": 4})
        c = self.client
        self.assertEqual(c.launch("demo.iris", tag="a", replicas=2, config={"lr": 1}, priority=3)["replicas"], 2)
        self.assertEqual(c.actors(), [{"name": "demo.iris-a"}])
        c.kill("demo.iris-a")
        q = c.queue("jobs/1")
        q.put({"x": 1})
        self.assertEqual(q.get(wait=0.5), {"x": 1})
        self.assertIsNone(q.get(wait=0))
        self.assertEqual(len(q), 4)
        reqs = [(r["method"], r["path"], r["body"]) for r in self.server.requests]
        self.assertEqual(
            reqs,
            [
                ("POST", "/api/v1/actors", {"module": "demo.iris", "tag": "a", "replicas": 2, "config": {"lr": 1}, "priority": 3}),
                ("GET", "/api/v1/actors", None),
                ("DELETE", "/api/v1/actors/demo.iris-a", None),
                ("POST", "/api/v1/queues/jobs%2F1", {"x": 1}),
                ("POST", "/api/v1/queues/jobs%2F1/get?wait=0.5", None),
                ("POST", "/api/v1/queues/jobs%2F1/get?wait=0", None),
                ("GET", "/api/v1/queues/jobs%2F1", None),
            ],
        )
        # One kept-alive connection for all of them.
        self.assertEqual(len({r["peer"] for r in self.server.requests}), 1)

    def test_a_connection_closed_by_the_server_is_reopened(self):
        self.answer(200, [], {"Connection": "close"})
        self.answer(200, [])
        self.assertEqual(self.client.actors(), [])
        self.assertEqual(self.client.actors(), [])
        self.assertEqual(len({r["peer"] for r in self.server.requests}), 2)

    def test_a_connection_dropped_silently_is_retried_once(self):
        self.server.drop_after_answer = True
        self.answer(200, [1])
        self.answer(200, [2])
        self.assertEqual(self.client.actors(), [1])
        self.assertEqual(self.client.actors(), [2])
        self.assertEqual(len(self.server.requests), 2)

    def test_the_endpoint_comes_from_the_environment(self):
        with mock.patch.dict(os.environ, {"TESSERA_ENDPOINT": self.endpoint + "/"}):
            handle = tessera.connect("demo.iris")
        self.answer(200, self.ok(7))
        self.assertEqual(handle.predict(), 7)
        handle._client.close()
        with mock.patch.dict(os.environ, {}, clear=True):
            self.assertEqual(tessera.Client().endpoint, "http://127.0.0.1:7710")
        with self.assertRaises(ValueError):
            tessera.Client("ftp://x")


if __name__ == "__main__":
    unittest.main()
