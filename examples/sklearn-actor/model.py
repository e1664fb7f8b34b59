"""A scikit-learn classifier served as a Tessera actor.

It trains logistic regression on three quarters of the digits data set when the actor
starts, then answers `predict` (labels for rows of 64 pixel values, 0 to 16), `predict_proba`
and `score` (accuracy on the held-out quarter). Calls are counted in `self.local.state`,
which the node saves after every call and restores after a restart.
"""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

import tessera


class DigitsClassifier(tessera.Task):
    stateful = True

    def setup(self):
        x, y = load_digits(return_X_y=True)
        self.x_train, self.x_test, self.y_train, self.y_test = train_test_split(
            x / 16.0, y, test_size=0.25, random_state=0
        )
        max_iter = int(self.config.get("max_iter", 2000))
        self.model = LogisticRegression(max_iter=max_iter).fit(self.x_train, self.y_train)
        self.local.state.setdefault("calls", 0)
        self.log.info(f"trained on {len(self.x_train)} digits")

    def _rows(self, x):
        rows = np.asarray(x, dtype=np.float64)
        if rows.ndim == 1:
            rows = rows.reshape(1, -1)
        if rows.shape[1] != 64:
            raise ValueError(f"each row needs 64 pixel values, got {rows.shape[1]}")
        return rows / 16.0

    def predict(self, x):
        """Labels for rows of 64 pixels (0..16); a list, or a numpy array input."""
        self.local.state["calls"] += 1
        return self.model.predict(self._rows(x)).tolist()

    def predict_proba(self, x):
        self.local.state["calls"] += 1
        return self.model.predict_proba(self._rows(x))

    def score(self):
        """Accuracy on the held-out quarter."""
        return float(self.model.score(self.x_test, self.y_test))

    def sample(self, n=3):
        """`n` held-out rows (0..16) and their labels, to try `predict` with."""
        n = int(n)
        return {"x": (self.x_test[:n] * 16.0).round().tolist(), "y": self.y_test[:n].tolist()}

    def calls(self):
        return self.local.state["calls"]
