"""The safetensors format in pure Python (numpy is imported only when used).

Layout: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}),
then the tensors' little-endian, row-major bytes; offsets are relative to the end of the
header and the data regions are contiguous.
"""

import json
import struct

# safetensors dtype -> numpy dtype string (little-endian).
DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}

# Largest header accepted when decoding (the Rust implementation uses the same).
MAX_HEADER = 100_000_000


class SafetensorsError(ValueError):
    """The bytes are not a valid safetensors file, or a tensor cannot be encoded."""


def _np():
    try:
        import numpy
    except ImportError as e:  # pragma: no cover - depends on the interpreter
        raise ImportError("numpy is needed for tensors (pip install numpy): %s" % e) from None
    return numpy


def _code(np, dtype):
    kind, size = dtype.kind, dtype.itemsize
    table = {
        ("f", 8): "F64", ("f", 4): "F32", ("f", 2): "F16",
        ("i", 8): "I64", ("i", 4): "I32", ("i", 2): "I16", ("i", 1): "I8",
        ("u", 8): "U64", ("u", 4): "U32", ("u", 2): "U16", ("u", 1): "U8",
        ("b", 1): "BOOL",
    }
    code = table.get((kind, size))
    if code is None:
        raise SafetensorsError("cannot store dtype %s in safetensors" % dtype)
    return code


class Parts:
    """A safetensors file as buffers written one after another: its length-prefixed header,
    then each tensor's bytes (views of the arrays, not copies). Return one from a task as an
    output, or pass it where bytes are written, and a large model is never copied."""

    def __init__(self, buffers):
        self.buffers = [memoryview(b).cast("B") for b in buffers]
        self.nbytes = sum(b.nbytes for b in self.buffers)

    def __len__(self):
        return self.nbytes

    def __bytes__(self):
        return b"".join(self.buffers)


def encode_parts(tensors, metadata=None):
    """Encodes a dict name -> array-like as safetensors (names in sorted order), as Parts:
    arrays already contiguous in their little-endian dtype are not copied."""
    np = _np()
    header = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        if not isinstance(name, str):
            raise SafetensorsError("tensor names must be strings, not %r" % (name,))
        if name == "__metadata__":
            raise SafetensorsError("a tensor cannot be named __metadata__ (the header's metadata has that name)")
        arr = np.asarray(tensors[name])
        code = _code(np, arr.dtype)
        data = np.ascontiguousarray(arr, dtype=np.dtype(DTYPES[code])).reshape(-1).view(np.uint8)
        header[name] = {"dtype": code, "shape": [int(d) for d in arr.shape], "data_offsets": [offset, offset + data.nbytes]}
        chunks.append(data)
        offset += data.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return Parts([struct.pack("<Q", len(text)) + text] + chunks)


def encode(tensors, metadata=None):
    """Encodes a dict name -> array-like as safetensors bytes (names in sorted order)."""
    return bytes(encode_parts(tensors, metadata))


def decode_header(buf):
    """The parsed header of a safetensors buffer and where its data starts."""
    view = memoryview(buf)
    if view.nbytes < 8:
        raise SafetensorsError("shorter than 8 bytes")
    (n,) = struct.unpack("<Q", view[:8])
    if n > MAX_HEADER or 8 + n > view.nbytes:
        raise SafetensorsError("header length %d is invalid for %d bytes" % (n, view.nbytes))
    try:
        header = json.loads(bytes(view[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SafetensorsError("invalid header: %s" % e)
    if not isinstance(header, dict):
        raise SafetensorsError("the header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise SafetensorsError("__metadata__ must map strings to strings")
    return header, 8 + n


def _is_index(v):
    """A non-negative integer (JSON true and false are not integers here)."""
    return type(v) is int and v >= 0


def decode(buf):
    """Decodes safetensors bytes into a dict name -> numpy array.

    Arrays are views of `buf` when it is writable (bytearray), else of one private copy;
    either way they are writable.
    """
    np = _np()
    if isinstance(buf, Parts):
        buf = bytearray(bytes(buf))
    if isinstance(buf, memoryview):
        buf = buf if not buf.readonly else bytearray(buf)
    elif not isinstance(buf, bytearray):
        buf = bytearray(buf)
    header, start = decode_header(buf)
    size = memoryview(buf).nbytes - start
    out = {}
    regions = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise SafetensorsError("tensor %r: invalid entry" % name)
        code = info.get("dtype")
        if code not in DTYPES:
            raise SafetensorsError("tensor %r: unsupported dtype %r" % (name, code))
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_index(d) for d in shape)):
            raise SafetensorsError("tensor %r: invalid shape %r (a list of non-negative integers)" % (name, shape))
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)):
            raise SafetensorsError("tensor %r: invalid data_offsets %r (two non-negative integers)" % (name, offsets))
        begin, end = offsets
        dtype = np.dtype(DTYPES[code])
        count = 1
        for d in shape:
            count *= d
        if not (0 <= begin <= end <= size) or end - begin != count * dtype.itemsize:
            raise SafetensorsError("tensor %r: data_offsets %r do not fit shape %r" % (name, offsets, shape))
        regions.append((begin, end))
        if count == 0:
            arr = np.zeros(shape, dtype=dtype)
        else:
            arr = np.frombuffer(buf, dtype=dtype, count=count, offset=start + begin).reshape(shape)
        out[name] = arr.astype(dtype.newbyteorder("="), copy=False)
    regions.sort()
    pos = 0
    for begin, end in regions:
        if begin != pos:
            raise SafetensorsError("tensor data is not contiguous")
        pos = end
    if pos != size:
        raise SafetensorsError("%d bytes of data are not used by any tensor" % (size - pos))
    return out


def metadata(buf):
    """The __metadata__ of a safetensors buffer (an empty dict when absent)."""
    header, _ = decode_header(buf)
    meta = header.get("__metadata__") or {}
    return dict(meta) if isinstance(meta, dict) else {}


def is_safetensors(buf):
    """True when the bytes decode as safetensors (checks the header only, not numpy)."""
    try:
        header, start = decode_header(buf)
    except SafetensorsError:
        return False
    return all(
        name == "__metadata__" or (isinstance(v, dict) and v.get("dtype") in DTYPES) for name, v in header.items()
    )
