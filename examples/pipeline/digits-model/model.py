"""A model module: one of three scikit-learn classifiers, picked by the `model` config."""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.tree import DecisionTreeClassifier

import tessera

MODELS = {
    "logreg": lambda: LogisticRegression(max_iter=2000),
    "knn": lambda: KNeighborsClassifier(n_neighbors=5),
    "tree": lambda: DecisionTreeClassifier(max_depth=8, random_state=0),
}


class DigitsModel(tessera.Task):
    def setup(self):
        kind = self.config.get("model", "logreg")
        if kind not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, not {kind!r}")
        x, y = load_digits(return_X_y=True)
        x_train, _, y_train, _ = train_test_split(x / 16.0, y, test_size=0.25, random_state=0)
        self.kind = kind
        self.model = MODELS[kind]().fit(x_train, y_train)

    def predict_proba(self, item):
        """Class probabilities for one item {"x": 64 values 0..1, "y": label}."""
        proba = self.model.predict_proba(np.asarray(item["x"], dtype=np.float64).reshape(1, -1))[0]
        return {"model": self.kind, "proba": proba.tolist(), "y": item["y"]}
