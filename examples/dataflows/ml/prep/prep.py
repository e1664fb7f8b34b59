"""Data operations: each is a function the dataflow calls with its inputs as keyword
arguments (a tensor as a numpy array); what it returns is its output (a numpy array for a
tensor)."""

import numpy as np

import tessera


class Prep(tessera.Task):
    def read_features(self, dataset):
        """dataset: str, a dataset of this node (safetensors: x float32 [n, d], y int [n])
        -> float32 [n, d], its rows"""
        return self.local.dataset(dataset).tensors()["x"]

    def read_labels(self, dataset):
        """dataset: str, as for read_features -> [int] n, its labels"""
        return self.local.dataset(dataset).tensors()["y"].astype(int).tolist()

    def standardize(self, features):
        """features: float32 [n, d] -> float64 [n, d], each column with zero mean and unit
        variance (a constant column is left at zero)."""
        x = np.asarray(features, dtype=np.float64)
        std = x.std(axis=0)
        std[std == 0] = 1.0
        return (x - x.mean(axis=0)) / std
