"""The node's statistics of a labelled dataset (tensors `x`: [rows, features], `y`:
[rows] integer labels in 0..classes).

Adds  results "histogram"  [classes] ints, rows per label
      results "sums"       [features] floats, per-feature sums (float64)
      results "rows"       int
"""

import numpy as np

import tessera


class Stats(tessera.Task):
    def run(self):
        classes = int(self.config["classes"])
        data = self.local.dataset(self.config["dataset"]).tensors()
        y = np.asarray(data["y"]).astype(np.int64).reshape(-1)
        x = np.asarray(data["x"], dtype=np.float64).reshape(len(y), -1)
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise ValueError("labels must be in 0..%d" % (classes - 1))
        histogram = np.bincount(y, minlength=classes)
        self.world.results.add("histogram", histogram.tolist())
        self.world.results.add("sums", x.sum(axis=0).tolist())
        self.world.results.add("rows", int(len(y)))
        self.log.info("%d rows, %d features" % (len(y), x.shape[1]))
