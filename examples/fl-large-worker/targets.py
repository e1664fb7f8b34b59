"""Writes a node's dataset for the large-model worker: a safetensors file of `target`
(float32, [1]) and `examples` (int64, [1]).

usage: python3 targets.py TARGET EXAMPLES OUT.safetensors"""

import json
import struct
import sys


def main():
    target, examples, out = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    header = {
        "examples": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
        "target": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + struct.pack("<q", examples) + struct.pack("<f", target))


if __name__ == "__main__":
    main()
