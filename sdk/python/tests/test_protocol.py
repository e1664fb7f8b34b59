import io
import struct
import unittest

import _path  # noqa: F401

from tessera import protocol


def raw(header, tail=b""):
    return struct.pack(">I", len(header)) + header + tail


class ProtocolTest(unittest.TestCase):
    def test_round_trip(self):
        buf = io.BytesIO()
        protocol.write_frame(buf, {"type": "call", "id": 3}, [("a", "bytes", b"xyz"), ("b", "json", bytearray(b"[1]"))])
        protocol.write_frame(buf, {"type": "shutdown"})
        buf.seek(0)
        header, blobs = protocol.read_frame(buf)
        self.assertEqual(header["type"], "call")
        self.assertEqual(header["blobs"], [{"name": "a", "len": 3, "kind": "bytes"}, {"name": "b", "len": 3, "kind": "json"}])
        self.assertEqual([bytes(b) for b in blobs], [b"xyz", b"[1]"])
        self.assertEqual(protocol.read_frame(buf)[0], {"type": "shutdown"})
        self.assertIsNone(protocol.read_frame(buf))

    def test_parts_are_written_one_after_another(self):
        from tessera import safetensors

        parts = safetensors.Parts([b"abc", bytearray(b"de"), memoryview(b"fgh")])
        a, b = io.BytesIO(), io.BytesIO()
        protocol.write_frame(a, {"type": "result"}, [("model", "tensor", parts)])
        protocol.write_frame(b, {"type": "result"}, [("model", "tensor", b"abcdefgh")])
        self.assertEqual(a.getvalue(), b.getvalue())

    def test_hostile_input_is_refused(self):
        cases = [
            raw(b"not json"),
            raw(b"[1]"),
            raw(b"{}"),
            raw(b'{"type":1}'),
            raw(b'{"type":"x","blobs":{}}'),
            raw(b'{"type":"x","blobs":[{"len":1}]}'),
            raw(b'{"type":"x","blobs":[{"name":"a","len":-1}]}'),
            raw(b'{"type":"x","blobs":[{"name":"a","len":1,"kind":"pickle"}]}'),
            raw(b'{"type":"x","blobs":[{"name":"a","len":4}]}', b"ab"),
            raw(b'{"type":"x"}')[:-2],
            b"\x00\x00",
        ]
        for data in cases:
            with self.assertRaises(protocol.ProtocolError, msg=repr(data)):
                protocol.read_frame(io.BytesIO(data))
        with self.assertRaises(protocol.ProtocolError):
            protocol.read_frame(io.BytesIO(b"\xff\xff\xff\xff"), max_bytes=1 << 20)

    def test_headers_never_carry_nan(self):
        with self.assertRaises(ValueError):
            protocol.encode_header({"type": "result", "x": float("nan")})


if __name__ == "__main__":
    unittest.main()
