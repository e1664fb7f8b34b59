"""The safetensors corpus shared with the Rust tests (crates/tessera-core/tests/fixtures/
safetensors): valid files written by the Python and the Rust writers with the values they
hold, and invalid files every reader must refuse. `python safetensors_corpus.py` rewrites
the Python-written and the invalid files and corpus.json; the Rust-written files come from
`TESSERA_WRITE_FIXTURES=1 cargo test -p tessera-core --test safetensors_corpus`.
"""

import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.normpath(os.path.join(HERE, "..", "..", "..", "crates", "tessera-core", "tests", "fixtures", "safetensors"))

# Valid files: what each holds. `writer` says which side writes it (and checks its bytes).
VALID = {
    "python-f32.safetensors": {
        "writer": "python",
        "metadata": {"format": "np"},
        "tensors": {"w": {"dtype": "F32", "shape": [2, 3], "values": [0.5, -1.25, 2.0, 3.0, -0.0, 1e-3]}},
    },
    "python-mixed.safetensors": {
        "writer": "python",
        "metadata": {},
        "tensors": {
            "a_f64": {"dtype": "F64", "shape": [2], "values": [1.5, -2.25]},
            "b_f16": {"dtype": "F16", "shape": [2], "values": [0.5, -2.0]},
            "c_i64": {"dtype": "I64", "shape": [], "values": [1099511627776]},
            "d_u8": {"dtype": "U8", "shape": [4], "values": [0, 1, 254, 255]},
            "e_bool": {"dtype": "BOOL", "shape": [2], "values": [True, False]},
            "f_i32": {"dtype": "I32", "shape": [1, 2], "values": [-7, 7]},
            "g_empty": {"dtype": "F32", "shape": [0, 3], "values": []},
        },
    },
    "rust-f32.safetensors": {
        "writer": "rust",
        "metadata": {},
        "tensors": {
            "b": {"dtype": "F32", "shape": [3], "values": [0.25, 0.5, 0.75]},
            "w": {"dtype": "F32", "shape": [2, 2], "values": [1.0, -1.0, 2.5, -2.5]},
        },
    },
    "rust-mixed.safetensors": {
        "writer": "rust",
        "metadata": {"library": "tessera"},
        "tensors": {
            "num_batches_tracked": {"dtype": "I64", "shape": [], "values": [42]},
            "half": {"dtype": "F16", "shape": [3], "values": [1.0, 0.5, -4.0]},
            "bytes": {"dtype": "U8", "shape": [2], "values": [7, 9]},
        },
    },
}


def _file(header, data=b"", pad=True):
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _t(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# Invalid files: name -> (bytes, why).
INVALID = {
    "short.safetensors": (b"\x01\x02\x03", "shorter than the 8-byte header length"),
    "header-past-end.safetensors": (struct.pack("<Q", 1000) + b"{}", "the header length runs past the end"),
    "header-not-json.safetensors": (_file(b"{not json"), "the header is not JSON"),
    "header-array.safetensors": (_file(b"[1,2,3]"), "the header is not an object"),
    "shape-bool.safetensors": (_file({"x": _t("F32", [True], 0, 4)}, b"\0" * 4), "a shape holds true"),
    "shape-negative.safetensors": (_file({"x": _t("F32", [-1], 0, 4)}, b"\0" * 4), "a negative dimension"),
    "shape-float.safetensors": (_file({"x": _t("F32", [1.0], 0, 4)}, b"\0" * 4), "a dimension that is not an integer"),
    "offsets-bool.safetensors": (_file({"x": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, b"\0"), "offsets that are booleans"),
    "offsets-do-not-fit.safetensors": (_file({"x": _t("F32", [2], 0, 4)}, b"\0" * 4), "offsets shorter than the shape"),
    "offsets-past-end.safetensors": (_file({"x": _t("F32", [2], 0, 8)}, b"\0" * 4), "offsets past the data"),
    "gap.safetensors": (_file({"x": _t("U8", [1], 1, 2)}, b"\0\0"), "data not contiguous"),
    "overlap.safetensors": (_file({"x": _t("U8", [2], 0, 2), "y": _t("U8", [2], 1, 3)}, b"\0" * 3), "regions overlap"),
    "trailing.safetensors": (_file({"x": _t("U8", [1], 0, 1)}, b"\0\0"), "bytes that no tensor uses"),
    "dtype-unknown.safetensors": (_file({"x": _t("F8", [1], 0, 1)}, b"\0"), "an unknown dtype"),
    "metadata-tensor.safetensors": (
        _file({"__metadata__": _t("U8", [1], 0, 1)}, b"\0"),
        "__metadata__ that is a tensor, not strings",
    ),
    "metadata-not-strings.safetensors": (_file({"__metadata__": {"epochs": 3}}), "metadata values that are not strings"),
}

# Valid files written by hand (no writer writes them): both readers take them as below.
# A tensor named twice in the header is read as the JSON readers of both sides read it:
# the last entry wins.
HAND = {
    "duplicate-key.safetensors": (
        _file(b'{"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\x05"),
        {"writer": "hand", "metadata": {}, "tensors": {"x": {"dtype": "U8", "shape": [1], "values": [5]}}},
    ),
}


def write_python_side():
    sys.path.insert(0, os.path.join(HERE, ".."))
    import numpy as np

    from tessera import safetensors

    os.makedirs(CORPUS, exist_ok=True)
    for name, spec in VALID.items():
        if spec["writer"] != "python":
            continue
        with open(os.path.join(CORPUS, name), "wb") as f:
            f.write(safetensors.encode(arrays(np, spec), metadata=spec["metadata"] or None))
    for name, (data, _) in list(INVALID.items()) + list(HAND.items()):
        with open(os.path.join(CORPUS, name), "wb") as f:
            f.write(data)
    valid = dict(VALID)
    valid.update({n: spec for n, (_, spec) in HAND.items()})
    corpus = {"valid": valid, "invalid": {n: why for n, (_, why) in INVALID.items()}}
    with open(os.path.join(CORPUS, "corpus.json"), "w") as f:
        json.dump(corpus, f, indent=1, sort_keys=True)
        f.write("\n")


DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "U8": "u1", "BOOL": "?"}


def arrays(np, spec):
    """The arrays a corpus entry describes."""
    return {n: np.array(t["values"], dtype=np.dtype(DTYPES[t["dtype"]])).reshape(t["shape"]) for n, t in spec["tensors"].items()}


if __name__ == "__main__":
    write_python_side()
