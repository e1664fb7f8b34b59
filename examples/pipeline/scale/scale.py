"""A transformation module: pixel values 0..16 to 0..1 (no numpy needed)."""

import tessera


class Scale(tessera.Task):
    def apply(self, item):
        return {"x": [v / 16.0 for v in item["x"]], "y": item["y"]}
