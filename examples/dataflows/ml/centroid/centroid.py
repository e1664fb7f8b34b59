"""A nearest-centroid classifier as dataflow operations."""

import numpy as np

import tessera

# The share of rows the model is fitted on; the rest are held out for `score`.
TRAIN = 0.7


def _train_rows(n):
    return max(1, int(n * TRAIN))


class Centroid(tessera.Task):
    def fit(self, features, labels):
        """features: float64 [n, d], labels: [int] n -> {class: [float] d}, the mean row of
        each class among the first 70% of rows."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels)
        k = _train_rows(len(x))
        x, y = x[:k], y[:k]
        return {str(int(c)): x[y == c].mean(axis=0).tolist() for c in np.unique(y)}

    def predict(self, centroids, features):
        """centroids: {class: [float] d}, features: float64 [n, d] -> [int] n, the class of
        the nearest centroid (Euclidean) for each row."""
        classes = sorted(centroids, key=int)
        c = np.asarray([centroids[k] for k in classes], dtype=np.float64)
        x = np.asarray(features, dtype=np.float64)
        d = ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
        return [int(classes[i]) for i in d.argmin(axis=1)]

    def score(self, predictions, labels):
        """predictions: [int] n, labels: [int] n -> float, the accuracy on the rows after the
        first 70% (those `fit` did not see)."""
        k = _train_rows(len(labels))
        p, y = np.asarray(predictions[k:]), np.asarray(labels[k:])
        return float((p == y).mean()) if len(y) else 0.0
