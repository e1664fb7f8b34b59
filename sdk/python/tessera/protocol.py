"""The Tessera frame protocol (see docs/protocol.md), over binary file objects.

A frame is a 4-byte big-endian header length H, H bytes of UTF-8 JSON (an object with a
"type"), then, for each entry of the header's optional "blobs" array
({"name", "len", "kind"}), exactly len raw bytes, in order.
"""

import json
import struct

PROTOCOL_VERSION = 1
KINDS = ("json", "tensor", "bytes")


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


def _nbytes(b):
    if isinstance(b, memoryview):
        return b.nbytes
    return len(b)


def _buffers(b):
    """The buffers a blob is written as: its parts when it has them (safetensors.Parts)."""
    return getattr(b, "buffers", (b,))


def encode_header(header, blobs=()):
    """The length prefix and JSON of a header; blobs are (name, kind, bytes-like)."""
    h = dict(header)
    h.pop("blobs", None)
    if blobs:
        h["blobs"] = [{"name": n, "len": _nbytes(b), "kind": k} for (n, k, b) in blobs]
    text = json.dumps(h, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    if len(text) > 0xFFFFFFFF:
        raise ProtocolError("header too large")
    return struct.pack(">I", len(text)) + text


def write_frame(wfile, header, blobs=()):
    """Writes a frame (header dict and (name, kind, bytes-like or safetensors.Parts) blobs)
    and flushes."""
    wfile.write(encode_header(header, blobs))
    for (_, _, b) in blobs:
        for part in _buffers(b):
            wfile.write(part)
    wfile.flush()


def _read_exact(rfile, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = rfile.readinto(view[got:])
        if not k:
            raise ProtocolError("the stream ended inside a frame")
        got += k
    return buf


def read_frame(rfile, max_bytes=None):
    """Reads a frame: (header dict, [bytearray blobs]); None on a clean end of stream.

    Raises ProtocolError for anything invalid (and lengths over max_bytes, if given).
    """
    first = rfile.read(4)
    if not first:
        return None
    if len(first) < 4:
        first = bytes(first) + bytes(_read_exact(rfile, 4 - len(first)))
    (n,) = struct.unpack(">I", first)
    if max_bytes is not None and n > max_bytes:
        raise ProtocolError("a frame header of %d bytes exceeds the limit of %d bytes" % (n, max_bytes))
    raw = _read_exact(rfile, n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError("invalid JSON in a frame header: %s" % e)
    if not isinstance(header, dict):
        raise ProtocolError("the header is not a JSON object")
    if not isinstance(header.get("type"), str):
        raise ProtocolError('the header has no "type"')
    specs = header.get("blobs")
    specs = [] if specs is None else specs
    if not isinstance(specs, list):
        raise ProtocolError('"blobs" is not an array')
    blobs = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError("blobs[%d] has no name" % i)
        ln = spec.get("len")
        if not isinstance(ln, int) or isinstance(ln, bool) or ln < 0:
            raise ProtocolError("blobs[%d] has no valid len" % i)
        if spec.get("kind", "bytes") not in KINDS:
            raise ProtocolError("blobs[%d] has an unknown kind %r" % (i, spec.get("kind")))
        if max_bytes is not None and ln > max_bytes:
            raise ProtocolError("blob %r of %d bytes exceeds the limit of %d bytes" % (spec["name"], ln, max_bytes))
        blobs.append(_read_exact(rfile, ln))
    return header, blobs
