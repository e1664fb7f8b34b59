"""Data operations: each is a function the dataflow calls with its inputs as keyword
arguments; what it returns is its output (a mapping when it has several)."""

import numpy as np

import tessera

# Features travel as JSON: four decimals keep them exact enough and small.
DECIMALS = 4


class Prep(tessera.Task):
    def load(self, dataset):
        """dataset: str, a dataset of this node (safetensors: x float32 [n, d], y int [n])
        -> {features: [[float]] n x d, labels: [int] n}"""
        t = self.local.dataset(dataset).tensors()
        return {"features": t["x"].tolist(), "labels": t["y"].astype(int).tolist()}

    def standardize(self, features):
        """features: [[float]] n x d -> [[float]] n x d, each column with zero mean and unit
        variance (a constant column is left at zero)."""
        x = np.asarray(features, dtype=np.float64)
        std = x.std(axis=0)
        std[std == 0] = 1.0
        return np.round((x - x.mean(axis=0)) / std, DECIMALS).tolist()
