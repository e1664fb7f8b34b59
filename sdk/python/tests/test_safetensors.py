import json
import os
import struct
import unittest

import _path  # noqa: F401

from tessera import safetensors


class SafetensorsTest(unittest.TestCase):
    def setUp(self):
        self.np = _path.require_numpy()

    def test_parts_are_the_encoding_without_copies(self):
        np = self.np
        w = np.arange(1000, dtype=np.float32)
        tensors = {"w": w, "n": np.array(7, dtype=np.int64), "h": np.ones(3, dtype=np.float16)}
        parts = safetensors.encode_parts(tensors, metadata={"k": "v"})
        self.assertEqual(bytes(parts), safetensors.encode(tensors, metadata={"k": "v"}))
        self.assertEqual(len(parts), len(bytes(parts)))
        # The parts are views of the arrays: a change shows through.
        w[0] = 42
        self.assertEqual(safetensors.decode(bytes(parts))["w"][0], 42)
        # A non-contiguous array or another byte order is converted, as before.
        strided = np.arange(10, dtype=">f4")[::2]
        back = safetensors.decode(bytes(safetensors.encode_parts({"s": strided})))["s"]
        np.testing.assert_array_equal(back, strided)

    def test_round_trip_of_every_dtype(self):
        np = self.np
        tensors = {
            "f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
            "f64": np.array([1.5, -2.25, np.pi]),
            "f16": np.array([[1, 2]], dtype=np.float16),
            "i64": np.array([-(2 ** 40), 0, 2 ** 40], dtype=np.int64),
            "i32": np.array([-1, 7], dtype=np.int32),
            "i8": np.array([-128, 127], dtype=np.int8),
            "u8": np.arange(5, dtype=np.uint8),
            "u16": np.array([65535], dtype=np.uint16),
            "bool": np.array([True, False, True]),
            "scalar": np.float32(3.5),
            "empty": np.zeros((0, 3), dtype=np.float32),
        }
        data = safetensors.encode(tensors, metadata={"format": "np"})
        back = safetensors.decode(data)
        self.assertEqual(sorted(back), sorted(tensors))
        for name, arr in tensors.items():
            arr = np.asarray(arr)
            self.assertEqual(back[name].dtype, arr.dtype, name)
            self.assertEqual(back[name].shape, arr.shape, name)
            np.testing.assert_array_equal(back[name], arr)
        self.assertEqual(safetensors.metadata(data), {"format": "np"})
        # Decoded arrays are writable.
        back["f32"][0, 0] = 9
        self.assertTrue(safetensors.is_safetensors(data))

    def test_layout_matches_the_format(self):
        np = self.np
        data = safetensors.encode({"b": np.array([1, 2], dtype=np.int32), "a": np.array([1.0], dtype=np.float32)})
        (n,) = struct.unpack("<Q", data[:8])
        self.assertEqual(n % 8, 0, "the header is padded to 8 bytes")
        header = json.loads(data[8:8 + n])
        self.assertEqual(header["a"], {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
        self.assertEqual(header["b"], {"dtype": "I32", "shape": [2], "data_offsets": [4, 12]})
        self.assertEqual(data[8 + n:], struct.pack("<f", 1.0) + struct.pack("<ii", 1, 2))
        # Big-endian input is stored little-endian.
        be = np.array([1, 256], dtype=">i4")
        self.assertEqual(safetensors.decode(safetensors.encode({"x": be}))["x"].tolist(), [1, 256])

    def test_a_file_written_by_hand_decodes(self):
        # What the Rust `safetensors` crate writes for one F32 tensor [2] = [1, 2].
        header = b'{"data":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
        header += b" " * (-len(header) % 8)
        blob = struct.pack("<Q", len(header)) + header + struct.pack("<ff", 1.0, 2.0)
        self.assertEqual(safetensors.decode(blob)["data"].tolist(), [1.0, 2.0])

    def test_invalid_input_is_refused(self):
        np = self.np
        good = safetensors.encode({"x": np.ones(4, dtype=np.float32)})
        bad = [
            b"",
            b"\x00" * 7,
            struct.pack("<Q", 10 ** 12) + b"{}",
            struct.pack("<Q", 2) + b"[]",
            struct.pack("<Q", 4) + b"nope",
            good[:-1],
            good + b"\x00",
            good.replace(b'"F32"', b'"C64"'),
            good.replace(b"[0,16]", b"[0,12]"),
        ]
        for blob in bad:
            with self.assertRaises(safetensors.SafetensorsError, msg=repr(blob[:40])):
                safetensors.decode(blob)
        self.assertFalse(safetensors.is_safetensors(b"hello world"))
        with self.assertRaises(safetensors.SafetensorsError):
            safetensors.encode({"x": np.array(["text"])})
        with self.assertRaises(safetensors.SafetensorsError):
            safetensors.encode({"x": np.array([1 + 2j])})


if __name__ == "__main__":
    unittest.main()


class SharedCorpusTest(unittest.TestCase):
    """The corpus the Rust tests read too (crates/tessera-core/tests/fixtures/safetensors)."""

    def setUp(self):
        self.np = _path.require_numpy()
        import safetensors_corpus

        self.corpus_module = safetensors_corpus
        with open(os.path.join(safetensors_corpus.CORPUS, "corpus.json")) as f:
            self.corpus = json.load(f)

    def read(self, name):
        with open(os.path.join(self.corpus_module.CORPUS, name), "rb") as f:
            return f.read()

    def test_every_valid_file_decodes_to_its_values(self):
        np = self.np
        for name, spec in self.corpus["valid"].items():
            data = self.read(name)
            back = safetensors.decode(data)
            self.assertEqual(sorted(back), sorted(spec["tensors"]), name)
            for t, want in self.corpus_module.arrays(np, spec).items():
                self.assertEqual(back[t].dtype, want.dtype, "%s/%s" % (name, t))
                self.assertEqual(back[t].shape, want.shape, "%s/%s" % (name, t))
                np.testing.assert_array_equal(back[t], want, "%s/%s" % (name, t))
            self.assertEqual(safetensors.metadata(data), spec["metadata"], name)
            if spec["writer"] == "python":
                again = safetensors.encode(self.corpus_module.arrays(np, spec), metadata=spec["metadata"] or None)
                self.assertEqual(again, data, "%s: the Python writer no longer writes these bytes" % name)

    def test_every_invalid_file_is_refused_with_the_sdks_error(self):
        for name, why in self.corpus["invalid"].items():
            with self.assertRaises(safetensors.SafetensorsError, msg="%s (%s)" % (name, why)):
                safetensors.decode(self.read(name))
            self.assertFalse(safetensors.is_safetensors(self.read(name)) and name.startswith("header"), name)

    def test_a_tensor_named_like_the_metadata_is_refused_when_written(self):
        np = self.np
        with self.assertRaises(safetensors.SafetensorsError):
            safetensors.encode({"__metadata__": np.zeros(2)})
